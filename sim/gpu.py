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
        """Fraction of time busy in the last sample period (0-1)."""


class _Segment:
    """What the GPU is doing from ``start_s`` on: idle at constant power, or a ``Stretch``."""

    __slots__ = ("clock", "idle_power_w", "start_s", "stretch")

    def __init__(self, start_s: float, stretch: Stretch | None, idle_power_w: float, clock: float) -> None:
        self.start_s = start_s
        self.stretch = stretch
        self.idle_power_w = idle_power_w
        self.clock = clock

    def energy_until(self, t: float) -> float:
        dt = t - self.start_s
        if dt <= 0:
            return 0.0
        if self.stretch is None:
            return self.idle_power_w * dt
        return self.stretch.energy_by(dt)

    def power_at(self, t: float) -> float:
        if self.stretch is None:
            return self.idle_power_w
        s = self.stretch
        m = s.iterations_done_by(t - self.start_s)
        if m >= s.iterations:
            return self.idle_power_w
        return s.iter_energy(m) / s.iter_time(m)


class SimGpu:
    """A simulated GPU: same interface as the NVML one, driven by the simulated engine."""

    def __init__(self, env: simpy.Environment, spec: GpuSpec, index: int, actuation_delay_s: float = 0.1) -> None:
        self.env = env
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.actuation_delay_s = actuation_delay_s
        self._limit_w = spec.default_power_limit_w
        self._requested_w = self._limit_w
        self._energy_closed_j = 0.0
        self._segment = _Segment(env.now, None, spec.idle_power_w, spec.min_clock_fraction)
        self._busy_s_closed = 0.0
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

    # ----- activity, energy, telemetry -------------------------------------------------------------------
    def begin_segment(self, stretch: Stretch | None) -> None:
        """The engine starts a stretch (or goes idle with ``None``) now."""
        now = self.env.now
        seg = self._segment
        self._energy_closed_j += seg.energy_until(now)
        if seg.stretch is not None:
            self._busy_s_closed += min(now - seg.start_s, seg.stretch.time_of(seg.stretch.iterations))
        clock = stretch.clock if stretch is not None else self.spec.min_clock_fraction
        self._segment = _Segment(now, stretch, self.spec.idle_power_w, clock)

    def get_total_energy_j(self) -> float:
        """Energy since creation, exact to the current simulated time."""
        return self._energy_closed_j + self._segment.energy_until(self.env.now)

    def get_power_w(self) -> float:
        """Power of the iteration running now (idle power between steps)."""
        return self._segment.power_at(self.env.now)

    def get_sm_clock_mhz(self) -> float:
        """Current SM clock (the governor's choice; idle parks at the lowest clock)."""
        return self._segment.clock * self.spec.sm_clock_max_mhz

    def get_busy_time_s(self) -> float:
        """Cumulative time spent running engine steps."""
        seg = self._segment
        busy = self._busy_s_closed
        if seg.stretch is not None:
            busy += min(self.env.now - seg.start_s, seg.stretch.time_of(seg.stretch.iterations))
        return busy

    def get_utilization(self) -> float:
        """Busy fraction since creation (the plant differentiates it per window)."""
        return self.get_busy_time_s() / self.env.now if self.env.now > 0 else 0.0
