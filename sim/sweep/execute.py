"""Running a sweep on Dask: a ``LocalCluster`` (processes, one thread each) or an existing scheduler.

Each run is one task, ``run_one(scenario)``, which never raises: a run that fails is returned as failed with
its message. The driver records every finished run in ``results.parquet`` as it arrives (atomically), skips
runs already recorded on ``--resume``, and regenerates ``report.html`` at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.errors import PalsError
from sim.io import write_json_atomic, write_text_atomic
from sim.scenario import Scenario
from sim.sweep.expand import Sweep, load_sweep
from sim.sweep.results import RESULTS_FILE, ResultsTable
from sim.sweep.spec import SweepError

LOCK_FILE = ".lock"  # held (flock) by the sweep running in the folder

ProgressCallback = Callable[[int, int, int, int], None]  # (done, failed, running, total)


def run_one(scenario: Scenario) -> dict[str, Any]:
    """Simulate one resolved scenario exactly as ``pals run`` does (``sim.run.run_scenario``); never raises.

    Returns ``{"status": "ok" | "failed", "error": message, "wall_s": seconds, "totals": summary totals}``.
    """
    from sim.run import run_scenario

    t0 = time.perf_counter()
    try:
        totals = run_scenario(scenario).summary["totals"]
    except PalsError as exc:
        return {"status": "failed", "error": str(exc), "wall_s": time.perf_counter() - t0, "totals": None}
    except Exception as exc:  # a user policy, a simulator bug: recorded, never fatal to the sweep
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0,
                "totals": None}
    return {"status": "ok", "error": "", "wall_s": time.perf_counter() - t0,
            "totals": {k: (v.item() if hasattr(v, "item") else v) for k, v in totals.items()}}


@contextlib.contextmanager
def _sigint_held() -> Iterator[list[int]]:
    """Hold a Ctrl-C meanwhile (main thread only: elsewhere signal handlers cannot be set): it is recorded, not
    acted on, and the caller raises ``KeyboardInterrupt`` once it has something it can close."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _dask_logs_quiet() -> Iterator[None]:
    """Silence Dask's and Tornado's own logging meanwhile: a lost scheduler or a cancelled connection is reported
    by the sweep in one line (``execute``), not by pages of tracebacks from their loggers."""
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask client: on an existing scheduler (``tcp://HOST:PORT``) or on a new ``LocalCluster`` of ``workers``
    processes with one thread each (default: one per core)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise SweepError(f"--scheduler {scheduler}: cannot connect to the Dask scheduler ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    n = (os.cpu_count() or 1) if workers is None else workers
    if n < 1:
        raise SweepError(f"--workers {n}: expected at least 1")
    from sim.sweep.quiet import QuietOnCtrlC

    cluster = client = None
    with _sigint_held() as ctrl_c:  # a Ctrl-C while the workers start stops the sweep once they can be closed
        try:
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client = Client(cluster)
            client.register_plugin(QuietOnCtrlC())
        except Exception:
            for part in (client, cluster):
                if part is not None:
                    with contextlib.suppress(Exception):
                        part.close()
            if ctrl_c:  # the Ctrl-C also reached a starting worker, which died of it: an interruption, not a failure
                raise KeyboardInterrupt from None
            raise
    try:
        if ctrl_c:
            raise KeyboardInterrupt
        yield client
    finally:
        client.close()
        cluster.close()


def execute(sweep: Sweep, table: ResultsTable, client: Any, progress: ProgressCallback | None = None,
            poll_s: float = 0.25) -> None:
    """Submit every run not yet in ``table`` and record each as it finishes (see the module docstring)."""
    from distributed import as_completed

    total = len(sweep.runs)
    pending = [r for r in sweep.runs if r.key not in table.rows]
    futures = {client.submit(run_one, r.scenario, pure=False, priority=-r.index): r for r in pending}
    keys = {f.key for f in futures}

    def counts() -> tuple[int, int]:
        failed = sum(1 for row in table.rows.values() if row["status"] != "ok")
        return len(table.rows), failed

    def running() -> int:
        if client.status != "running":  # asking would wait for a reconnection
            return 0
        try:
            return sum(1 for ks in client.processing().values() for k in ks if k in keys)
        except Exception:  # the scheduler is going away: the loop notices it from client.status
            return 0

    if progress:
        progress(*counts(), 0, total)
    done_iter = as_completed(futures)
    try:
        while not done_iter.is_empty():
            _check_client(client)
            batch = done_iter.next_batch(block=False)
            if not batch:
                time.sleep(poll_s)
            for fut in batch:
                if fut.status in ("lost", "pending"):  # its result was in a worker that died: Dask recomputes it
                    done_iter.add(fut)
                    continue
                table.record(futures[fut], _outcome(fut, client))
                keys.discard(fut.key)
                fut.release()
            if progress:
                progress(*counts(), running(), total)
    except BaseException:
        with contextlib.suppress(Exception):  # the client may be closed already (the scheduler went away)
            client.cancel(list(futures))
        raise


def _check_client(client: Any) -> None:
    """Raise ``ConnectionError`` (an ``OSError``: "lost the Dask cluster") once the client lost its scheduler."""
    if client.status != "running":
        raise ConnectionError(f"the Dask client is {client.status}: the scheduler went away")


def _outcome(fut: Any, client: Any) -> dict[str, Any]:
    """The outcome of a run's finished task: ``run_one``'s result, or a failed run when the task itself died
    (its worker process died, its result could not be deserialised)."""
    if fut.status == "cancelled":  # nobody cancels a sweep's tasks but a scheduler that lost this client
        _check_client(client)
        raise ConnectionError("the scheduler cancelled the sweep's tasks")
    try:
        if fut.status == "finished":
            outcome: dict[str, Any] = fut.result()
            return outcome
        reason: object = fut.exception() if fut.status == "error" else f"task {fut.status}"
    except Exception as exc:
        _check_client(client)
        reason = exc
    return {"status": "failed", "error": _failure_message(reason), "wall_s": float("nan"), "totals": None}


def _failure_message(reason: object) -> str:
    """One line for a task that died: ``worker process died: ...`` for a run that killed its workers."""
    from distributed import KilledWorker

    if isinstance(reason, KilledWorker):
        tries = getattr(reason, "allowed_failures", None)
        count = f"{tries + 1} worker processes" if isinstance(tries, int) else "the worker processes"
        return (f"worker process died: {count} died running this run (os._exit, a crash or out of memory in the "
                "simulation or a user policy?)")
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep call did."""

    total: int
    skipped: int  # already recorded (--resume)
    ok: int
    failed: int
    results_path: Path
    report_path: Path


def _manifest(sweep: Sweep) -> dict[str, Any]:
    return {
        "name": sweep.name, "spec": str(sweep.spec_path), "base": str(sweep.base_path), "runs": len(sweep.runs),
        "param_columns": sweep.param_columns, "budget_axis": sweep.budget_axis,
        "expansion": [{"run_index": r.index, "run_key": r.key, "seed": r.seed, "params": r.params,
                       "overrides": list(r.overrides)} for r in sweep.runs],
    }


def run_sweep(spec_path: str | Path, out: str | Path, workers: int | None = None, scheduler: str | None = None,
              resume: bool = False, retry_failed: bool = False, progress: ProgressCallback | None = None,
              client: Any = None) -> SweepOutcome:
    """Expand and validate the spec, then run what ``DIR/results.parquet`` lacks; write ``DIR/report.html``.

    Without ``resume``, an existing results file is refused; so is a folder another sweep is running in (it holds
    ``DIR/.lock``). ``client`` (a ``distributed.Client``) is used as is when given, else a cluster is made from
    ``workers`` / ``scheduler``.
    """
    sweep = load_sweep(spec_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    with _folder_lock(out):
        return _run_locked(sweep, out, workers, scheduler, resume, retry_failed, progress, client)


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.lock`` (``flock``, released by the kernel if the process dies)."""
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise SweepError(f"{path}: cannot create the sweep's lock file ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"--out {out}: another pals sweep is running in this folder (it holds {path}); "
                             "wait for it to end, or choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_locked(sweep: Sweep, out: Path, workers: int | None, scheduler: str | None, resume: bool,
                retry_failed: bool, progress: ProgressCallback | None, client: Any) -> SweepOutcome:
    """``run_sweep`` once ``out`` exists and is locked."""
    from distributed.client import ClosedClientError

    from sim.sweep.report import sweep_report

    results_path = out / RESULTS_FILE
    if results_path.exists() and not resume:
        raise SweepError(f"--out {out}: {RESULTS_FILE} already exists; pass --resume to complete that sweep "
                         "(finished runs are skipped), or choose another --out")
    for stale in out.glob(f".{RESULTS_FILE}.*.tmp"):  # a write cut short by a kill: the old file is intact
        stale.unlink(missing_ok=True)
    table = ResultsTable(sweep, results_path)
    if results_path.exists():
        table.load()
    if retry_failed:
        table.drop_failed()
    skipped = len(table.rows)
    _write(out / "sweep.json", lambda p: write_json_atomic(p, _manifest(sweep)))
    if len(table.rows) < len(sweep.runs):
        try:
            if client is not None:
                execute(sweep, table, client, progress)
            else:
                with _dask_logs_quiet(), dask_client(workers, scheduler) as c:
                    execute(sweep, table, c, progress)
        except (OSError, TimeoutError, ClosedClientError) as exc:  # the scheduler went away (CommClosedError is
            # an OSError); a failed write of results.parquet is a SweepError, not one of these
            raise SweepError(f"lost the Dask cluster after {len(table.rows)} of {len(sweep.runs)} runs ({exc}); "
                             f"finished runs are in {results_path}: rerun with --resume") from None
    elif progress:
        progress(len(table.rows), sum(r["status"] != "ok" for r in table.rows.values()), 0, len(sweep.runs))
    df = table.frame()
    if not results_path.exists():
        table.write()
    report_path = out / "report.html"
    try:
        page = sweep_report(sweep, df)
    except Exception as exc:  # a bug in the report must not hide the results, which are saved already
        reason = " ".join(str(exc).split())  # one line
        raise SweepError(f"{report_path}: cannot make the report ({type(exc).__name__}: {reason}); the results "
                         f"are in {results_path}") from None
    _write(report_path, lambda p: write_text_atomic(p, page))
    ok = int((df["status"] == "ok").sum())
    return SweepOutcome(len(sweep.runs), skipped, ok, len(df) - ok, results_path, report_path)


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(path)``; an ``OSError`` becomes a ``SweepError`` naming the file."""
    try:
        write(path)
    except OSError as exc:
        raise SweepError(f"{path}: cannot write ({exc.strerror or exc})") from None
