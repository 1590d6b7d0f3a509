"""The digital twin's simulation core: one deployment of a scenario, run by SimPy in real time.

``TwinSim`` owns a SimPy ``Environment`` holding every replica of the scenario's first deployment (engines
with the scenario's engine config and physics, one ``SimGpu`` per rank) behind the deployment's router. It
knows nothing of HTTP: requests come in through ``submit`` and every token, finish or drop goes out through
the request's ``TokenSink``, batched per advance and handed to ``deliver`` (the HTTP layer passes them to
its event loop).

Real-time coupling: the twin's clock is ``speedup x (wall time since start)``. A dedicated thread
(``start``) sleeps until the wall instant of the next simulated event (or until woken by an arrival or a cap
change), then advances the environment to the current wall-clock-derived time. Every access from another
thread (an arrival, a telemetry read, a cap change) takes the same lock and first advances the simulation to
"now", so an arrival is injected at exactly ``speedup x`` its wall-clock receipt time and telemetry is exact
at the instant it is read. When the simulation cannot keep up (a very large speed-up under heavy load),
simulated time lags the wall clock and the events catch up in bursts; ``sim_time_s`` tells how far it got.

The engines run with iteration stepping (one SimPy event per engine step, whatever the scenario's
``stepping``) and report each token through ``Engine.on_tokens``, so every token is emitted at its own
simulated instant.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import simpy

from sim.build import build_physics, max_model_len, resolve_model
from sim.catalog.gpus import get_gpu
from sim.engine import Engine, kv_capacity_tokens
from sim.gpu import ActivityLedger, SimGpu
from sim.scenario import DeploymentConfig, Scenario
from sim.workload import Request

log = logging.getLogger("pals.twin")

UTILIZATION_SAMPLE_S = 1.0 / 6.0  # simulated seconds between utilization samples (NVML: 1/6 s to 1 s)
UTILIZATION_WINDOW_SAMPLES = 6  # utilization is the busy share over the last 6 samples (1 s of simulated time)
MAX_SLEEP_S = 0.05  # wall seconds the thread sleeps at most between advances


class TwinRequestError(ValueError):
    """A request the twin's engine cannot serve (too long for the model or the KV cache)."""


class TokenSink(Protocol):
    """Where one request's events go (called from the thread that advanced the simulation)."""

    def token(self, sim_time_s: float) -> None:
        """One output token sampled at ``sim_time_s``."""

    def finish(self, sim_time_s: float) -> None:
        """The request finished (every token has been reported)."""

    def error(self, message: str) -> None:
        """The engine dropped the request."""

    def fail(self, message: str) -> None:
        """The simulation itself failed: the request can never finish."""


@dataclass(frozen=True)
class DeviceReading:
    """One simulated GPU's telemetry, in the twin's internal units (W, J, MHz, s, 0-1)."""

    index: int
    name: str
    power_w: float
    total_energy_j: float
    power_limit_w: float
    requested_power_limit_w: float
    power_limit_range_w: tuple[float, float]
    default_power_limit_w: float
    sm_clock_mhz: float
    utilization: float


Event = tuple[TokenSink, str, float | str]  # (sink, "token" | "finish" | "error", sim time or message)


class _UtilizationSampler:
    """Busy share of one replica over the last second of simulated time, sampled like NVML."""

    def __init__(self, env: simpy.Environment, ledger: ActivityLedger) -> None:
        self.env = env
        self.ledger = ledger
        self.samples: deque[tuple[float, float]] = deque([(env.now, ledger.busy_s())],
                                                         maxlen=UTILIZATION_WINDOW_SAMPLES + 1)

    def sample(self) -> None:
        """Record (now, busy time so far)."""
        self.samples.append((self.env.now, self.ledger.busy_s()))

    def utilization(self) -> float:
        """Busy share from the oldest sample kept to now (0 before any time has passed)."""
        t0, busy0 = self.samples[0]
        dt = self.env.now - t0
        if dt <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.ledger.busy_s() - busy0) / dt))


class TwinSim:
    """The scenario's first deployment, simulated in real time (see the module docstring)."""

    def __init__(self, scenario: Scenario, speedup: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not (speedup > 0 and math.isfinite(speedup)):
            raise ValueError(f"speed-up must be a positive number, got {speedup}")
        self.scenario = scenario
        self.speedup = float(speedup)
        self._clock = clock
        dep: DeploymentConfig = scenario.deployments[0]
        self.deployment = dep
        self.model_name = dep.model if isinstance(dep.model, str) else dep.name
        self.model = resolve_model(scenario, dep)
        self.gpu_spec = get_gpu(dep.gpu)
        self.phys = build_physics(scenario, dep, self.gpu_spec, self.model)
        self.kv_capacity_tokens = kv_capacity_tokens(self.phys, dep.engine.gpu_memory_utilization,
                                                     dep.engine.max_num_batched_tokens)
        self.max_model_len = max_model_len(dep, self.model)
        self.block_size = dep.engine.block_size
        self.env = simpy.Environment()
        self.gpus: list[SimGpu] = []
        self.engines: list[Engine] = []
        self._samplers: list[_UtilizationSampler] = []
        n_per = self.phys.par.num_gpus
        for r in range(dep.replicas):
            ledger = ActivityLedger(self.env, self.gpu_spec)
            gpus = [SimGpu(self.env, self.gpu_spec, r * n_per + k, scenario.power.cap_actuation_delay_s, ledger)
                    for k in range(n_per)]
            self.gpus.extend(gpus)
            engine = Engine(self.env, self.phys, gpus, replica=r, max_num_seqs=dep.engine.max_num_seqs,
                            max_num_batched_tokens=dep.engine.max_num_batched_tokens,
                            block_size=dep.engine.block_size, kv_capacity_tokens=self.kv_capacity_tokens,
                            max_model_len=self.max_model_len, iteration_stepping=True,
                            on_finish=self._on_finish, on_drop=self._on_drop)
            engine.on_tokens = self._on_tokens
            self.engines.append(engine)
            self._samplers.append(_UtilizationSampler(self.env, ledger))
        self.env.process(self._sample_utilization())
        self._sinks: dict[int, TokenSink] = {}
        self._pending: list[Event] = []
        self._next_id = 0
        self._rr = 0
        self.requests_submitted = 0
        self.requests_finished = 0
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = clock()
        self.deliver: Callable[[list[Event]], None] = deliver_inline
        self.failure: BaseException | None = None

    # ----- clock ------------------------------------------------------------------------------------------
    def target_sim_time_s(self) -> float:
        """Simulated time that corresponds to the wall clock now."""
        return self.speedup * (self._clock() - self._t0)

    @property
    def sim_time_s(self) -> float:
        """Simulated time reached."""
        return self.env.now

    def _advance_locked(self) -> None:
        """Run every event up to the wall-clock-derived time (caller holds the lock)."""
        if self.failure is not None:
            raise RuntimeError(f"the twin's simulation stopped: {self.failure!r}")
        target = self.target_sim_time_s()
        if target <= self.env.now:
            return
        try:
            self.env.run(until=target)
            # Events due at exactly this instant, and the stop marker SimPy re-queues at ``now`` (priority -1,
            # no callbacks), which would otherwise make ``peek()`` say "now" and the thread spin.
            while self.env.peek() <= self.env.now:
                self.env.step()
        except BaseException as exc:  # a bug in the simulation: stop serving, say why
            self.failure = exc
            log.exception("twin simulation failed")
            # Requests in flight would wait forever: end each with the reason.
            self._pending.extend((sink, "failed", f"the twin's simulation failed: {exc!r}")
                                 for sink in self._sinks.values())
            self._sinks.clear()
            self._flush()
            raise

    def _flush(self) -> None:
        """Hand the events gathered by the last advance to ``deliver`` (caller holds the lock)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self.deliver(batch)

    def advance(self) -> float:
        """Bring the simulation up to the wall clock now; return the simulated time reached."""
        with self._lock:
            self._advance_locked()
            self._flush()
            return self.env.now

    # ----- the real-time thread ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the clock (simulated time 0 is now) and the thread that runs the simulation in real time."""
        if self._thread is not None:
            return
        with self._lock:
            if self.env.now == 0.0:
                self._t0 = self._clock()
        self._thread = threading.Thread(target=self._run, name="pals-twin-sim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the real-time thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._advance_locked()
                    self._flush()
                    next_s = self.env.peek()
            except BaseException as exc:  # a simulation failure is already recorded; anything else is now
                if self.failure is None:
                    self.failure = exc
                    log.exception("twin simulation thread failed")
                return
            # Sleep until the wall instant of the next event (arrivals and cap changes wake the thread early).
            wait_s = MAX_SLEEP_S
            if math.isfinite(next_s):
                wait_s = min(wait_s, self._t0 + next_s / self.speedup - self._clock())
            if wait_s > 0:
                self._wake.wait(wait_s)
            self._wake.clear()

    def _sample_utilization(self):
        while True:
            yield self.env.timeout(UTILIZATION_SAMPLE_S)
            for s in self._samplers:
                s.sample()

    # ----- requests ---------------------------------------------------------------------------------------
    def check_request(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``TwinRequestError`` when a request can never be served (vLLM rejects it with a 400)."""
        total = prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise TwinRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). Please reduce "
                f"the length of the prompt or completion.")
        if total + self.block_size > self.kv_capacity_tokens:
            raise TwinRequestError(
                f"the request needs {total} tokens of KV cache but a replica holds {self.kv_capacity_tokens} "
                f"(prompt {prompt_tokens} + max_tokens {max_tokens})")

    def submit(self, prompt_tokens: int, max_tokens: int, sink: TokenSink) -> int:
        """A request arrives now: route it to a replica; its events go to ``sink``. Returns its id."""
        self.check_request(prompt_tokens, max_tokens)
        with self._lock:
            self._advance_locked()
            rid = self._next_id
            self._next_id += 1
            req = Request(rid, self.env.now, prompt_tokens, max_tokens, self.deployment.name)
            self._sinks[rid] = sink
            self.requests_submitted += 1
            self._route(req).submit(req)
            self._flush()
        self._wake.set()
        return rid

    def _route(self, req: Request) -> Engine:
        """The replica a request goes to (the deployment's router, as in the simulated plant)."""
        if self.deployment.router == "round-robin":
            engine = self.engines[self._rr % len(self.engines)]
            self._rr += 1
            return engine
        best = self.engines[0]
        for e in self.engines[1:]:
            if e.outstanding < best.outstanding:
                best = e
        return best

    def _on_tokens(self, reqs: list[Request], count: int) -> None:
        now = self.env.now
        for req in reqs:
            sink = self._sinks.get(req.id)
            if sink is not None:
                self._pending.extend([(sink, "token", now)] * count)

    def _on_finish(self, req: Request) -> None:
        sink = self._sinks.pop(req.id, None)
        self.requests_finished += 1
        if sink is not None:
            self._pending.append((sink, "finish", self.env.now))

    def _on_drop(self, req: Request) -> None:
        sink = self._sinks.pop(req.id, None)
        if sink is not None:
            self._pending.append((sink, "error", req.drop_reason))

    # ----- devices ----------------------------------------------------------------------------------------
    def _check_index(self, index: int) -> SimGpu:
        if not 0 <= index < len(self.gpus):
            raise IndexError(f"no GPU {index}: the twin has {len(self.gpus)} (indices 0-{len(self.gpus) - 1})")
        return self.gpus[index]

    def _reading(self, gpu: SimGpu) -> DeviceReading:
        n_per = self.phys.par.num_gpus
        return DeviceReading(
            index=gpu.index, name=gpu.name, power_w=gpu.get_power_w(), total_energy_j=gpu.get_total_energy_j(),
            power_limit_w=gpu.get_power_limit_w(), requested_power_limit_w=gpu.get_requested_power_limit_w(),
            power_limit_range_w=gpu.get_power_limit_range_w(), default_power_limit_w=gpu.get_default_power_limit_w(),
            sm_clock_mhz=gpu.get_sm_clock_mhz(), utilization=self._samplers[gpu.index // n_per].utilization())

    def read_devices(self) -> tuple[float, list[DeviceReading]]:
        """Simulated time now and every GPU's telemetry at that instant."""
        with self._lock:
            self._advance_locked()
            self._flush()
            return self.env.now, [self._reading(g) for g in self.gpus]

    def read_device(self, index: int) -> DeviceReading:
        """One GPU's telemetry now; ``IndexError`` for an unknown index."""
        with self._lock:
            gpu = self._check_index(index)
            self._advance_locked()
            self._flush()
            return self._reading(gpu)

    def set_power_limit_w(self, index: int, power_w: float) -> DeviceReading:
        """Request a new limit on GPU ``index`` now (in force after the actuation delay).

        ``IndexError`` for an unknown index, ``GpuError`` outside the device's range.
        """
        with self._lock:
            gpu = self._check_index(index)
            self._advance_locked()
            gpu.set_power_limit_w(power_w)  # GpuError outside the range
            self._flush()
            reading = self._reading(gpu)
        self._wake.set()
        return reading


def deliver_inline(batch: list[Event]) -> None:
    """Hand simulation events to their sinks on the calling thread (the default: the simulation's own; the
    server calls it on its event loop)."""
    for sink, kind, value in batch:
        if kind == "token":
            sink.token(float(value))
        elif kind == "finish":
            sink.finish(float(value))
        elif kind == "failed":
            sink.fail(str(value))
        else:
            sink.error(str(value))
