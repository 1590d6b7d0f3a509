"""A PID on the relative throughput error, and the hysteresis that decides when to reconfigure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Pid:
    """Discrete PID on the relative error ``e = (target - measured) / target``.

    ``update`` returns a correction factor for the target handed to the offline model: ``1 + u`` with
    ``u = kp·e + ki·Σe·dt + kd·Δe/dt``, clamped to ``[1 - limit, 1 + limit]``; the integrator stops
    accumulating while the output is clamped (anti-windup).
    """

    kp: float = 0.5
    ki: float = 0.2
    kd: float = 0.0
    limit: float = 0.5
    integral: float = 0.0
    _last_error: float = field(default=math.nan, repr=False)

    def update(self, error: float, dt: float) -> float:
        """One period: the new correction factor."""
        deriv = 0.0 if math.isnan(self._last_error) or dt <= 0 else (error - self._last_error) / dt
        self._last_error = error
        trial = self.integral + error * dt
        u = self.kp * error + self.ki * trial + self.kd * deriv
        if -self.limit <= u <= self.limit:
            self.integral = trial
        else:
            u = max(-self.limit, min(self.limit, u))
        return 1.0 + u

    def reset(self) -> None:
        """Forget the history (a new target or budget)."""
        self.integral = 0.0
        self._last_error = math.nan


@dataclass
class Hysteresis:
    """Reconfigure only when the error stays beyond ``threshold`` for ``periods`` consecutive periods."""

    threshold: float = 0.05
    periods: int = 3
    count: int = 0

    def update(self, error: float) -> bool:
        """True when a reconfiguration is due."""
        if abs(error) > self.threshold:
            self.count += 1
        else:
            self.count = 0
        if self.count >= self.periods:
            self.count = 0
            return True
        return False
