"""Running a sweep on Dask: a ``LocalCluster`` (processes, one thread each) or an existing scheduler.

Each run is one task, ``run_one(scenario)``, which never raises: a run that fails is returned as failed with
its message. The driver records every finished run in ``results.parquet`` as it arrives (atomically), skips
runs already recorded on ``--resume``, and regenerates ``report.html`` at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    n = workers or os.cpu_count() or 1
    if n < 1:
        raise SweepError(f"--workers {n}: expected at least 1")
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
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
        try:
            return sum(1 for ks in client.processing().values() for k in ks if k in keys)
        except (OSError, TimeoutError):
            return 0

    if progress:
        progress(*counts(), 0, total)
    done_iter = as_completed(futures)
    try:
        while not done_iter.is_empty():
            batch = done_iter.next_batch(block=False)
            if not batch:
                time.sleep(poll_s)
            for fut in batch:
                run = futures[fut]
                if fut.status == "finished":
                    outcome = fut.result()
                else:  # the task itself died (worker lost, result not deserialisable, cancelled): a failed run
                    reason = fut.exception() if fut.status == "error" else f"task {fut.status}"
                    message = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
                    outcome = {"status": "failed", "error": message, "wall_s": float("nan"), "totals": None}
                table.record(run, outcome)
                keys.discard(fut.key)
                fut.release()
            if progress:
                progress(*counts(), running(), total)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


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

    Without ``resume``, an existing results file is refused. ``client`` (a ``distributed.Client``) is used as is
    when given, else a cluster is made from ``workers`` / ``scheduler``.
    """
    from sim.sweep.report import sweep_report

    sweep = load_sweep(spec_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out}: exists and is not a folder")
    results_path = out / RESULTS_FILE
    if results_path.exists() and not resume:
        raise SweepError(f"--out {out}: {RESULTS_FILE} already exists; pass --resume to complete that sweep "
                         "(finished runs are skipped), or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    for stale in out.glob(f".{RESULTS_FILE}.*.tmp"):  # a write cut short by a kill: the old file is intact
        stale.unlink(missing_ok=True)
    table = ResultsTable(sweep, results_path)
    if results_path.exists():
        table.load()
    if retry_failed:
        table.drop_failed()
    skipped = len(table.rows)
    write_json_atomic(out / "sweep.json", _manifest(sweep))
    if len(table.rows) < len(sweep.runs):
        try:
            if client is not None:
                execute(sweep, table, client, progress)
            else:
                with dask_client(workers, scheduler) as c:
                    execute(sweep, table, c, progress)
        except (OSError, TimeoutError) as exc:  # the scheduler went away (CommClosedError is an OSError)
            raise SweepError(f"lost the Dask cluster after {len(table.rows)} of {len(sweep.runs)} runs ({exc}); "
                             f"finished runs are in {results_path}: rerun with --resume") from None
    elif progress:
        progress(len(table.rows), sum(r["status"] != "ok" for r in table.rows.values()), 0, len(sweep.runs))
    df = table.frame()
    if not results_path.exists():
        table.write()
    report_path = out / "report.html"
    write_text_atomic(report_path, sweep_report(sweep, df))
    ok = int((df["status"] == "ok").sum())
    return SweepOutcome(len(sweep.runs), skipped, ok, len(df) - ok, results_path, report_path)
