"""The wall-clock plant: the simulator's controller driving a real server and real GPUs.

``HilPlant`` replays one deployment's workload (``hil.loadgen``) against a vLLM OpenAI-compatible server
(``hil.engine``) through an admission gate (``hil.gate``: the batch knob), and every ``control.period_s`` of
scenario time reads the GPUs (the ``sim.gpu.Gpu`` protocol: NVML, or the twin's devices), builds the same
``Observation`` the simulator builds, asks the controller, and applies its ``Action``: a power limit per GPU
and the admission limit. The controller, its offline model, the throughput target and the budget split are
the simulator's own: a ``SimPlant`` of the scenario is built (never run) and its deployment's controller is
the one used here.

Time: scenario seconds = ``speedup`` × wall seconds since the start (``speedup`` is 1 on real hardware; the
twin runs faster than real time). Every record is in scenario seconds, so a run compares line by line with
``pals run`` of the same scenario. Records are written every ``flush_every_s`` wall seconds, atomically;
on SIGINT or SIGTERM the plant stops sending, settles what is in flight as unfinished, and returns, so the
caller restores the power limits and writes what was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hil.engine import EngineDriver, ServerInfo, normalise_url, probe_server
from hil.gate import AdmissionGate
from hil.limits import HANDLED_SIGNALS, limits_note, restore_failures
from hil.loadgen import WorkloadReplay
from hil.records import (
    EnergyCounter,
    HilDeploymentRecords,
    RecordsCapture,
    RunSnapshot,
    ServerCounters,
    copy_request,
    frames,
    write_records,
)
from hil.telemetry import GpuReading, read_gpu, window_power_w
from sim.control import Action, Observation
from sim.errors import PalsError
from sim.gpu import Gpu, GpuError
from sim.io import write_text_atomic
from sim.plant import RECORD_COLUMNS, RunResult, SimPlant, Timeseries
from sim.scenario import Scenario, scenario_to_yaml
from sim.workload import Request

FLUSH_EVERY_S = 2.0  # wall seconds between snapshots of the records on disk
UNFINISHED_IN_FLIGHT = "unfinished: still in the engine when the run ended"
UNFINISHED_WAITING = "unfinished: waiting for admission when the run ended"


class HilError(PalsError):
    """A hardware run that cannot start (scenario shape, GPUs, server)."""


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def check_shape(scenario: Scenario, gpus: list[Gpu]) -> None:
    """A hardware run drives one server (one replica) on the GPUs given; raise ``HilError`` otherwise."""
    if len(scenario.deployments) != 1:
        raise HilError(f"pals hil drives one deployment (one vLLM server); the scenario has "
                       f"{len(scenario.deployments)}: keep one in the scenario file")
    dep = scenario.deployments[0]
    if dep.replicas != 1:
        raise HilError(f"deployments.0.replicas={dep.replicas}: pals hil drives one vLLM server, i.e. one replica; "
                       "use --set deployments.0.replicas=1 (and tensor parallelism for several GPUs)")
    need = dep.parallelism.tensor * dep.parallelism.data
    if len(gpus) != need:
        raise HilError(f"--gpus gives {len(gpus)} GPU(s); deployment {dep.name!r} runs on tensor x data = {need}")


@dataclass
class HilOutcome:
    """How a hardware run ended and what it recorded."""

    summary: dict[str, Any]
    interrupted_by: str | None  # signal name, or None when the run finished
    out_dir: Path
    wall_s: float
    restore_failures: list[tuple[int, str]] = field(default_factory=list)  # (GPU index, error) of failed restores


@dataclass
class _Window:
    first_tokens: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class HilPlant:
    """One deployment of a scenario on a real (or twin) server and GPUs, controlled in wall-clock time."""

    def __init__(self, scenario: Scenario, gpus: list[Gpu], endpoint: str, out_dir: str | Path, *,
                 speedup: float = 1.0, flush_every_s: float = FLUSH_EVERY_S, request_timeout_s: float = 600.0,
                 report: bool = True, log: Callable[[str], None] | None = None) -> None:
        check_shape(scenario, gpus)
        if not speedup > 0:
            raise HilError(f"speed-up must be positive, got {speedup}")
        self.scenario = scenario
        self.gpus = gpus
        self.url = normalise_url(endpoint)
        self.out_dir = Path(out_dir)
        self.speedup = float(speedup)
        self.flush_every_s = flush_every_s
        self.request_timeout_s = request_timeout_s
        self.report = report
        self.log = log or (lambda _msg: None)
        # The simulator's own plant, built and never run: its controller, offline model, target and budget split.
        self.model_plant = SimPlant(scenario)
        self.sim_dep = self.model_plant.deployments[0]
        self.controller = self.sim_dep.controller
        self.budget = self.model_plant.budget
        self.cfg = scenario.deployments[0]
        self.period_s = scenario.control.period_s
        self.records = HilDeploymentRecords(
            self.cfg.name, self.cfg, self.sim_dep.model, self.sim_dep.gpu_spec,
            [EnergyCounter() for _ in gpus], [ServerCounters()], self.sim_dep.target_tokens_per_s)
        self.timeseries = Timeseries()
        self.budget_windows: list[tuple[float, float, float]] = []
        self.infeasible_windows = 0
        self.gate = AdmissionGate(self.cfg.engine.max_num_seqs)
        self.max_num_seqs = self.cfg.engine.max_num_seqs
        self._window = _Window()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._admitted: set[int] = set()
        self._stop = asyncio.Event()
        self._closing = False
        self._sample_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.interrupted_by: str | None = None
        self._t0 = 0.0
        self._last_sample_s = 0.0
        self._energy0_j: list[float] = []
        self._last_readings: list[GpuReading] = []
        self._last_tokens = 0
        self._last_action: Action | None = None
        self._caps_set_w: list[float | None] = [None] * len(gpus)
        self.range_w: tuple[float, float] = (0.0, 0.0)
        self.server: ServerInfo | None = None
        self.driver: EngineDriver | None = None
        self.replay: WorkloadReplay | None = None
        self.wall_s = 0.0
        self.end_s = 0.0
        self.actuation_errors: list[str] = []
        self._refusals: set[str] = set()
        self.failure: Exception | None = None

    # ----- time ----------------------------------------------------------------------------------------
    def now_s(self) -> float:
        """Scenario seconds since the start."""
        return (time.perf_counter() - self._t0) * self.speedup

    def _wall_until(self, scenario_s: float) -> float:
        """Wall seconds from now until scenario time ``scenario_s``."""
        return (scenario_s - self.now_s()) / self.speedup

    # ----- GPUs ----------------------------------------------------------------------------------------
    async def _read_gpus(self, with_power: bool = False) -> tuple[float, list[GpuReading]]:
        """Every GPU's telemetry (in a thread: NVML and the twin's HTTP calls block), and the scenario time of
        the reading (the middle of the calls)."""
        before = self.now_s()
        readings = await asyncio.to_thread(lambda: [read_gpu(g, with_power) for g in self.gpus])
        return 0.5 * (before + self.now_s()), readings

    async def _apply(self, action: Action) -> None:
        """Apply a controller's action: caps to every GPU (clamped to its range), the admission limit."""
        if action == self._last_action:
            return
        self._last_action = action
        caps = action.power_cap_w
        if len(caps) != len(self.gpus):
            raise HilError(f"{self.cfg.name}: the controller returned {len(caps)} caps for {len(self.gpus)} GPUs")
        lo, hi = self.range_w
        wanted = [min(max(float(c), lo), hi) for c in caps]
        todo = [(i, w) for i, w in enumerate(wanted) if self._caps_set_w[i] != w]
        if todo:
            def set_all() -> list[GpuError]:
                refused = []
                for i, w in todo:
                    try:
                        self.gpus[i].set_power_limit_w(w)
                        self._caps_set_w[i] = w
                    except GpuError as exc:  # not permitted, out of range: the limit in force stays
                        refused.append(exc)
                return refused
            for exc in await asyncio.to_thread(set_all):
                self._refused(exc)
        self.max_num_seqs = min(max(1, int(action.max_num_seqs)), self.cfg.engine.max_num_batched_tokens)
        self.gate.set_limit(self.max_num_seqs)

    # ----- requests ------------------------------------------------------------------------------------
    def _submit(self, req: Request) -> None:
        """The workload issues a request: it joins the admission queue now."""
        if self._stop.is_set():
            return
        req.replica = 0
        self.records.requests.append(req)
        if self._closing:  # due before the end, issued as the run ends: recorded, never sent (as in the simulator)
            assert self.replay is not None
            req.arrival_s = float(self.replay.env.now)
            req.drop_reason = UNFINISHED_WAITING
            self.records.dropped.append(req)
            return
        req.arrival_s = self.now_s()
        self._tasks[req.id] = asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: Request) -> None:
        assert self.driver is not None and self.replay is not None
        admitted = False
        try:
            await self.gate.acquire()
            admitted = True
            self._admitted.add(req.id)
            await self.driver.complete(req)
        except Exception as exc:  # the driver turns every failure into a drop reason; this is a last resort
            req.drop_reason = f"client error: {type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            req.drop_reason = UNFINISHED_IN_FLIGHT if admitted else UNFINISHED_WAITING
            req.finish_s = math.nan
            self.records.dropped.append(req)
            return
        finally:
            if admitted:
                self.gate.release()
                self._admitted.discard(req.id)
            self._tasks.pop(req.id, None)
        if req.drop_reason:
            self.records.dropped.append(req)
        else:
            self._window.finished.append(req)
        self.replay.settle(req, self.now_s())
        self._wake.set()

    def _first_token(self, req: Request) -> None:
        self._window.first_tokens.append(req)

    # ----- telemetry and control ---------------------------------------------------------------------
    def _observation(self, now: float, window: float, readings: list[GpuReading], budget_share_w: float,
                     tokens: int) -> Observation:
        if window > 0:
            powers = [window_power_w(prev, r, window) for r, prev in zip(readings, self._last_readings, strict=True)]
        else:
            powers = [r.power_w for r in readings]
        firsts, finished = self._window.first_tokens, self._window.finished
        tpots = [(q.finish_s - q.first_token_s) / (q.generated - 1) for q in finished if q.generated > 1]
        return Observation(
            time_s=now, window_s=window, deployment=self.cfg.name,
            output_tokens_per_s=(tokens - self._last_tokens) / window if window > 0 else 0.0,
            gpu_power_w=tuple(powers), power_cap_w=tuple(r.power_limit_w for r in readings),
            power_limit_range_w=self.range_w, max_num_seqs=self.max_num_seqs, queue_len=self.gate.waiting,
            running=self.gate.in_flight, ttft_p50_s=_median([q.first_token_s - q.arrival_s for q in firsts]),
            tpot_p50_s=_median(tpots), budget_w=budget_share_w,
            throughput_target_tokens_per_s=self.sim_dep.target_tokens_per_s)

    async def _sample(self, act: bool) -> None:
        """Record one window for every GPU; let the controller act when ``act`` (as ``SimPlant.sample``)."""
        async with self._sample_lock:
            if act and self._stop.is_set():
                return
            await self._sample_locked(act)

    async def _sample_locked(self, act: bool) -> None:
        assert self.driver is not None
        now, readings = await self._read_gpus()
        window = now - self._last_sample_s
        if window <= 0:
            return
        tokens = self.driver.tokens_generated
        budget = self.budget.at(self._last_sample_s)  # in force during the window just ended
        split = self.model_plant.split(budget)
        self.infeasible_windows += not split.feasible
        upcoming = self.model_plant.split(self.budget.at(now))  # in force from now on
        share, next_share = split.shares_w[0], upcoming.shares_w[0]
        obs = self._observation(now, window, readings, next_share, tokens)
        waiting, running = self.gate.waiting, self.gate.in_flight
        for gpu, r, power, e0 in zip(self.gpus, readings, obs.gpu_power_w, self._energy0_j, strict=True):
            row = (now, window, self.cfg.name, 0, gpu.index, 1, power, r.energy_j - e0, [r.power_limit_w],
                   r.clock_mhz, r.utilization, running, self.max_num_seqs, waiting,
                   obs.output_tokens_per_s, budget, share, self.sim_dep.target_tokens_per_s)
            self.timeseries.rows.append(row)
        assert len(RECORD_COLUMNS) == len(row)
        for counter, r, e0 in zip(self.records.gpus, readings, self._energy0_j, strict=True):
            counter.energy_j = r.energy_j - e0
        self.records.engines[0].tokens = tokens
        self.budget_windows.append((now, sum(obs.gpu_power_w), budget))
        self._last_readings = readings
        self._last_tokens = tokens
        self._last_sample_s = self.end_s = now
        self._window = _Window()
        if act:
            await self._apply(await asyncio.to_thread(self.controller.decide, obs))

    def _refused(self, exc: GpuError) -> None:
        """A refused limit (permissions, range) is recorded, each distinct refusal once, and the run goes on
        with the limits in force."""
        if str(exc) not in self._refusals:
            self._refusals.add(str(exc))
            t = self.now_s() if self._t0 else 0.0
            self.actuation_errors.append(f"t={t:.1f} s: {exc}")
            self.log(f"warning: could not set a power limit: {exc}")

    async def _control_loop(self) -> None:
        period_wall = self.period_s / self.speedup
        k = 0
        start = time.perf_counter()
        while not self._stop.is_set():
            k += 1
            target = start + k * period_wall
            delay = target - time.perf_counter()
            if delay < 0:  # fell behind (slow telemetry): skip the missed ticks
                k += int(-delay // period_wall) + 1
                delay = start + k * period_wall - time.perf_counter()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, delay))
                return
            except TimeoutError:
                pass
            await self._sample(act=True)

    async def _dispatch_loop(self) -> None:
        """Issue the workload's requests at their scenario times; stop at the end of the scenario."""
        assert self.replay is not None
        duration = self.scenario.duration_s
        while not self._stop.is_set():
            now = self.now_s()
            if now >= duration:
                self._closing = True
                self.replay.advance(math.nextafter(duration, -math.inf))  # every arrival due before the end
                self._stop.set()
                return
            self.replay.advance(now)
            if self.replay.exhausted and not self._tasks:
                self._stop.set()
                return
            due = min(self.replay.next_due_s(), duration)
            self._wake.clear()
            wait = max(0.0, min(self._wall_until(due), 0.25))
            stop = asyncio.ensure_future(self._stop.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({stop, wake}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for fut in (stop, wake):
                fut.cancel()

    async def _flush_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.flush_every_s)
                return
            except TimeoutError:
                pass
            cap = self.capture(final=False)
            await asyncio.to_thread(lambda c=cap: write_records(self.out_dir, self.build_snapshot(c), False))

    def _on_signal(self, signum: int) -> None:
        if self.interrupted_by is None:
            self.interrupted_by = signal.Signals(signum).name
            self.log(f"{self.interrupted_by}: stopping; restoring the power limits and writing the records")
        self._stop.set()

    # ----- the run -------------------------------------------------------------------------------------
    async def run(self) -> RunSnapshot:
        """Run the scenario; return the final records (the caller writes them once the limits are restored)."""
        loop = asyncio.get_running_loop()
        handled: list[tuple[signal.Signals, Any]] = []
        for sig in HANDLED_SIGNALS:
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
                handled.append((sig, previous))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        try:
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:
                self.server = await probe_server(client, self.url)
                self.range_w = self.gpus[0].get_power_limit_range_w()
                spec = self.sim_dep.gpu_spec
                if self.range_w != (spec.power_limit_min_w, spec.power_limit_max_w):
                    self.log(f"warning: the GPUs accept {self.range_w[0]:g}-{self.range_w[1]:g} W, the scenario's "
                             f"{spec.name} {spec.power_limit_min_w:g}-{spec.power_limit_max_w:g} W: the controller's "
                             "caps are clamped to the GPUs' range")
                write_text_atomic(self.out_dir / "scenario.resolved.yaml", scenario_to_yaml(self.scenario))
                (self.out_dir / "report.html").unlink(missing_ok=True)  # an earlier run's: it would not match
                self._t0 = time.perf_counter()
                self.driver = EngineDriver(client, self.server, self.now_s, seed=self.scenario.seed,
                                           request_timeout_s=self.request_timeout_s,
                                           on_first_token=self._first_token)
                _, readings = await self._read_gpus(with_power=True)
                try:
                    await self._initial_action(readings)
                except PalsError:
                    raise
                except Exception as exc:  # a user policy that raises: one message, not a traceback
                    raise HilError(f"the controller failed on its first decision: {type(exc).__name__}: "
                                   f"{exc}") from None
                write_records(self.out_dir, self.snapshot(final=False), False)  # also warms up the writers
                _, readings = await self._read_gpus()
                self._energy0_j = [r.energy_j for r in readings]
                self._last_readings = readings
                self._t0 = time.perf_counter()  # scenario time 0: first action applied, nothing sent yet
                self.replay = WorkloadReplay(self.scenario, 0, self._submit)
                workers = [loop.create_task(self._guarded(c)) for c in (
                    self._dispatch_loop(), self._control_loop(), self._flush_loop())]
                try:
                    await self._stop.wait()
                finally:
                    self._stop.set()
                    await self._cancel_outstanding()
                    try:
                        await self._sample(act=False)  # the last, possibly partial, window
                    except Exception as exc:
                        self.failure = self.failure or exc
                    await asyncio.gather(*workers, return_exceptions=True)
        finally:
            for sig, previous in handled:  # give the signals back to whoever had them (the limits guard)
                loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)
        self.wall_s = time.perf_counter() - self._t0
        return self.snapshot(final=True)

    async def _guarded(self, work: Any) -> None:
        """Run a worker; an error in it (a GPU that vanished, a policy that raised) stops the run cleanly, and
        the records up to then are kept."""
        try:
            await work
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
                self.log(f"error: {type(exc).__name__}: {exc}; stopping")
            self._stop.set()

    async def _initial_action(self, readings: list[GpuReading]) -> None:
        """The controller's first action, at t=0 before any telemetry window (as ``SimPlant`` does)."""
        budget = self.budget.at(0.0)
        share = self.model_plant.split(budget).shares_w[0]
        obs = self._observation(0.0, 0.0, readings, share, 0)
        await self._apply(self.controller.decide(obs))

    async def _cancel_outstanding(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----- records -------------------------------------------------------------------------------------
    def capture(self, final: bool) -> RecordsCapture:
        """Copies of the records so far, taken on the event loop (cheap); ``build_snapshot`` turns them into
        frames anywhere (a worker thread for the periodic snapshots)."""
        in_flight = {} if final else {rid: rid in self._admitted for rid in self._tasks}
        wall = time.perf_counter() - self._t0 if self._t0 else 0.0
        hil = {"endpoint": self.url, "scenario_dir": str(Path(self.scenario.base_dir).resolve()),
               "server_model": self.server.model_id if self.server else None,
               "speedup": self.speedup, "gpus": [g.index for g in self.gpus],
               "gpu_names": sorted({g.name for g in self.gpus}), "wall_s": wall,
               "complete": final and self.interrupted_by is None and self.failure is None,
               "interrupted_by": self.interrupted_by,
               "error": f"{type(self.failure).__name__}: {self.failure}" if self.failure else None,
               "max_in_flight": self.gate.max_in_flight_seen, "actuation_errors": list(self.actuation_errors)}
        tokens = {k: list(v) for k, v in self.driver.token_times_s.items()} if (final and self.driver) else None
        return RecordsCapture(list(self.records.requests), list(self.records.dropped), in_flight,
                              list(self.timeseries.rows), list(self.budget_windows),
                              [g.energy_j for g in self.records.gpus], self.records.engines[0].tokens, self.end_s,
                              wall, self.infeasible_windows, hil, tokens)

    def build_snapshot(self, cap: RecordsCapture) -> RunSnapshot:
        """Frames and summary of captured records (requests still out count as unfinished)."""
        recs = self.records
        requests, dropped = list(cap.requests), list(cap.dropped)
        if cap.in_flight:
            done = {id(r) for r in dropped}
            for i, r in enumerate(requests):
                if r.id in cap.in_flight and id(r) not in done:
                    c = copy_request(r)
                    c.drop_reason = UNFINISHED_IN_FLIGHT if cap.in_flight[r.id] else UNFINISHED_WAITING
                    c.finish_s = math.nan
                    requests[i] = c
                    dropped.append(c)
        server = ServerCounters(cap.tokens, token_times_s=cap.token_times_s)
        view = HilDeploymentRecords(recs.name, recs.cfg, recs.model, recs.gpu_spec,
                                    [EnergyCounter(e) for e in cap.energies_j], [server],
                                    recs.target_tokens_per_s, requests, dropped)
        result = RunResult(self.scenario, cap.end_s, [view], Timeseries(cap.rows), cap.budget_windows, 0,
                           cap.wall_s, cap.infeasible_windows)
        summary, req_df, ts_df = frames(result, cap.hil)
        return RunSnapshot(self.scenario, summary, req_df, ts_df, cap.token_times_s)

    def snapshot(self, final: bool) -> RunSnapshot:
        """The records so far as frames and summary."""
        return self.build_snapshot(self.capture(final))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold the signals that end a run while the block runs (main thread only), then deliver the first one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def run_hil(scenario: Scenario, gpus: list[Gpu], endpoint: str, out_dir: str | Path, *, speedup: float = 1.0,
            guard: Callable[[list[Gpu]], Any] | None = None, report: bool = True,
            flush_every_s: float = FLUSH_EVERY_S, log: Callable[[str], None] | None = None) -> HilOutcome:
    """Run a scenario on a server and GPUs inside ``guard(gpus)`` (the context manager that restores every
    GPU's power limit), then write the outputs into ``out_dir``."""
    plant = HilPlant(scenario, gpus, endpoint, out_dir, speedup=speedup, flush_every_s=flush_every_s,
                     report=report, log=log)
    if guard is None:
        from hil.limits import restored_power_limits as guard
    with guard(gpus) as limits:
        snap = asyncio.run(plant.run())
    failures = restore_failures(limits)
    if failures:  # the records say so too: a later reader must not assume the node was left as found
        snap.summary["hil"]["power_limits_not_restored"] = [{"gpu": i, "error": e} for i, e in failures]
    with _signals_deferred():  # a second Ctrl-C must not leave the files half from the last flush
        write_records(Path(out_dir), snap, report)
    if plant.failure is not None:
        raise HilError(f"the run stopped on an error: {type(plant.failure).__name__}: {plant.failure} "
                       f"({limits_note(failures)}; the records up to then are in {out_dir})")
    return HilOutcome(snap.summary, plant.interrupted_by, Path(out_dir), plant.wall_s, failures)
