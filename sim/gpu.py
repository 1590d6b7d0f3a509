"""The GPU interface and ``SimGpu``, its simulated implementation.

Every implementation speaks W, J, MHz and seconds (NVML's mW and mJ are converted at its boundary).
``SimGpu`` keeps a monotonic energy counter fed by the engine's activity segments, applies power-limit
changes after an actuation delay, and reports the clock the governor chose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import simpy

from sim.catalog.gpus import GpuSpec
from sim.errors import PalsError
from sim.physics import Stretch


class GpuError(PalsError):
    """A GPU operation that failed (bad limit, device gone, not permitted)."""


@runtime_checkable
class Gpu(Protocol):
    """What a controller's plant needs from one GPU."""

    index: int
    name: str

    def get_power_limit_w(self) -> float:
        """The power limit in force."""

    def set_power_limit_w(self, power_w: float) -> None:
        """Request a new power limit (takes effect after the device's actuation delay)."""

    def get_power_limit_range_w(self) -> tuple[float, float]:
        """Lowest and highest accepted limit."""

    def get_default_power_limit_w(self) -> float:
        """The limit the device boots with."""

    def get_power_w(self) -> float:
        """Instantaneous power draw."""

    def get_total_energy_j(self) -> float:
        """Monotonic energy counter since the device was opened."""

    def get_sm_clock_mhz(self) -> float:
        """Current SM clock."""

    def get_utilization(self) -> float:
        """Fraction of the last sample period during which a kernel ran (0-1), as NVML counts it."""


class ActivityLedger:
    """What the GPUs of one replica are doing over time, and the energy each has used.

    The ranks of a replica run the same steps in lockstep (the step waits for the busiest rank), so they
    share one ledger: a sequence of segments, each idle (constant power) or a ``Stretch`` (closed-form
    energy). Energy to any instant is exact.
    """

    def __init__(self, env: simpy.Environment, spec: GpuSpec) -> None:
        self.env = env
        self.idle_power_w = spec.idle_power_w
        self.idle_clock = spec.min_clock_fraction
        self._start_s = env.now
        self._stretch: Stretch | None = None
        self._closed_energy_j = 0.0
        self._closed_busy_s = 0.0
        self._closed_clock_s = 0.0  # integral of the clock fraction over time
        self._memo_t = -1.0
        self._memo = (0.0, 0.0, 0.0)

    def begin(self, stretch: Stretch | None) -> None:
        """A stretch (or idleness, with ``None``) starts now; the previous segment closes."""
        now = self.env.now
        energy, busy, clock = self._segment(now)
        self._closed_energy_j += energy
        self._closed_busy_s += busy
        self._closed_clock_s += clock
        self._start_s = now
        self._stretch = stretch

    def _segment(self, t: float) -> tuple[float, float, float]:
        """Energy, busy time and clock integral of the current segment from its start to ``t``."""
        dt = t - self._start_s
        if dt <= 0:
            return 0.0, 0.0, 0.0
        s = self._stretch
        if s is None:
            return self.idle_power_w * dt, 0.0, self.idle_clock * dt
        total = s.total_time_s()
        if dt >= total * (1.0 - 1e-12):  # finished stretch (to rounding), then idle until t
            idle = dt - total if dt > total else 0.0
            running = dt - idle
            clock = self._sm_clock(s) * running + self.idle_clock * idle
            busy = s.busy_of(s.iterations, total)
            return s.total_energy_j() + self.idle_power_w * idle, busy if busy < running else running, clock
        return s.energy_by(dt), s.busy_by(dt), self._sm_clock(s) * dt

    def _sm_clock(self, s: Stretch) -> float:
        """The clock a stretch reports: a duty-cycled effective clock below the lowest one reads as the lowest
        clock, as NVML reports it (the gating shows in power and speed, not in the clock)."""
        return s.clock if s.clock > self.idle_clock else self.idle_clock

    def counters(self) -> tuple[float, float, float]:
        """``(energy_j, busy_s, clock_s)`` since the start, up to now: energy of one GPU, time a kernel ran
        (steps less their host waits: ``Stretch.busy_by``), and the integral of the clock fraction (window
        averages come from their changes)."""
        now = self.env.now
        if now != self._memo_t:
            energy, busy, clock = self._segment(now)
            self._memo_t = now
            self._memo = (self._closed_energy_j + energy, self._closed_busy_s + busy, self._closed_clock_s + clock)
        return self._memo

    def energy_j(self) -> float:
        """Energy of one GPU since the start, up to now."""
        return self.counters()[0]

    def busy_s(self) -> float:
        """Time a kernel ran since the start, up to now (NVML's utilization is its share of a window)."""
        return self.counters()[1]

    def power_w(self) -> float:
        """Power of the iteration running now (idle power between steps)."""
        s = self._stretch
        if s is None:
            return self.idle_power_w
        m = s.iterations_done_by(self.env.now - self._start_s)
        if m >= s.iterations:
            return self.idle_power_w
        return s.iter_energy(m) / s.iter_time(m)

    def clock(self) -> float:
        """SM clock fraction now (idle parks at the lowest clock)."""
        s = self._stretch
        if s is None or self.env.now - self._start_s >= s.total_time_s():
            return self.idle_clock
        return self._sm_clock(s)


class SimGpu:
    """A simulated GPU: same interface as the NVML one, driven by the simulated engine."""

    def __init__(self, env: simpy.Environment, spec: GpuSpec, index: int, actuation_delay_s: float = 0.1,
                 ledger: ActivityLedger | None = None) -> None:
        self.env = env
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.actuation_delay_s = actuation_delay_s
        self._limit_w = spec.default_power_limit_w
        self._requested_w = self._limit_w
        self.ledger = ledger or ActivityLedger(env, spec)
        self.timer_events = 0  # SimPy events scheduled for delayed limit changes
        self._listeners: list[Callable[[SimGpu], None]] = []

    # ----- power limit ----------------------------------------------------------------------------------
    def get_power_limit_w(self) -> float:
        """The limit in force (a requested change counts only after the actuation delay)."""
        return self._limit_w

    def get_requested_power_limit_w(self) -> float:
        """The most recently requested limit."""
        return self._requested_w

    def get_power_limit_range_w(self) -> tuple[float, float]:
        """The device's accepted range."""
        return self.spec.power_limit_min_w, self.spec.power_limit_max_w

    def get_default_power_limit_w(self) -> float:
        """Boot-time limit."""
        return self.spec.default_power_limit_w

    def set_power_limit_w(self, power_w: float) -> None:
        """Request a new limit; raises ``GpuError`` outside the device's range."""
        lo, hi = self.get_power_limit_range_w()
        if not lo <= power_w <= hi:
            raise GpuError(f"GPU {self.index} ({self.name}): power limit {power_w:g} W is outside the accepted range "
                           f"{lo:g}-{hi:g} W")
        if power_w == self._requested_w:
            return
        self._requested_w = power_w
        if self.actuation_delay_s <= 0:
            self._apply(power_w)
        else:
            self.timer_events += 1
            self.env.timeout(self.actuation_delay_s).callbacks.append(lambda _ev: self._apply(power_w))

    def _apply(self, power_w: float) -> None:
        if power_w == self._limit_w:
            return
        self._limit_w = power_w
        for listener in self._listeners:
            listener(self)

    def on_limit_change(self, listener: Callable[[SimGpu], None]) -> None:
        """Call ``listener(gpu)`` whenever a new limit takes effect (the engine re-plans its clock)."""
        self._listeners.append(listener)

    # ----- energy and telemetry (from the replica's activity ledger) -------------------------------------
    def get_total_energy_j(self) -> float:
        """Energy since creation, exact to the current simulated time."""
        return self.ledger.energy_j()

    def get_power_w(self) -> float:
        """Power of the iteration running now (idle power between steps)."""
        return self.ledger.power_w()

    def get_sm_clock_mhz(self) -> float:
        """Current SM clock (the governor's choice; idle parks at the lowest clock)."""
        return self.ledger.clock() * self.spec.sm_clock_max_mhz

    def get_busy_time_s(self) -> float:
        """Cumulative time a kernel ran: engine steps less their host waits."""
        return self.ledger.busy_s()

    def get_utilization(self) -> float:
        """Share of the time since creation during which a kernel ran (the plant's windows read the ledger's
        counters instead)."""
        return self.get_busy_time_s() / self.env.now if self.env.now > 0 else 0.0
