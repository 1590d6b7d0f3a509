"""Sharing one power budget between deployments with different models and throughput targets.

The even split gives each deployment a share proportional to its GPU count, whatever it needs (but never less
than its floor when the budget covers the floors: GPUs of different types have different lowest caps). The need
split first gives every deployment its floor (GPU count × lowest cap), then what its offline model says it
needs to meet its target (GPU count × the cap of the most efficient configuration that meets it), then
spreads what is left by GPU count. When the needs do not all fit, each gets its floor plus the same fraction
of what it needs above it. A budget below the sum of floors is infeasible: every deployment gets its floor
and the split says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """What one deployment asks of the budget."""

    num_gpus: int
    min_cap_w: float
    max_cap_w: float
    need_w: float = math.nan  # GPU power its target needs (nan: no target)

    @property
    def floor_w(self) -> float:
        """Every GPU at its lowest cap."""
        return self.num_gpus * self.min_cap_w

    @property
    def ceiling_w(self) -> float:
        """Every GPU at its highest cap."""
        return self.num_gpus * self.max_cap_w


@dataclass(frozen=True)
class Split:
    """Shares of a budget (W), one per claim, and whether the budget covered the floors."""

    shares_w: tuple[float, ...]
    feasible: bool


def even_split(budget_w: float, claims: list[Claim]) -> Split:
    """Shares proportional to GPU count, except that a feasible budget gives no deployment less than its floor
    (GPUs whose lowest cap is above the even share get that cap, and the others share what is left)."""
    feasible = budget_w >= sum(c.floor_w for c in claims)
    if not feasible or not math.isfinite(budget_w):
        total_gpus = sum(c.num_gpus for c in claims)
        return Split(tuple(budget_w * c.num_gpus / total_gpus for c in claims), feasible)
    at_floor: set[int] = set()
    while True:
        left = budget_w - sum(claims[i].floor_w for i in at_floor)
        gpus = sum(c.num_gpus for i, c in enumerate(claims) if i not in at_floor)
        shares = [c.floor_w if i in at_floor else left * c.num_gpus / gpus for i, c in enumerate(claims)]
        below = {i for i, c in enumerate(claims) if i not in at_floor and shares[i] < c.floor_w}
        if not below:
            return Split(tuple(shares), True)
        at_floor |= below


def need_split(budget_w: float, claims: list[Claim]) -> Split:
    """Shares that first cover each deployment's need for its target (see the module docstring)."""
    floors = [c.floor_w for c in claims]
    if not math.isfinite(budget_w):
        return Split(tuple(math.inf for _ in claims), True)
    if budget_w < sum(floors):
        return Split(tuple(floors), False)
    needs = [min(c.ceiling_w, max(c.floor_w, c.need_w)) if not math.isnan(c.need_w) else c.floor_w for c in claims]
    extra_needed = sum(n - f for n, f in zip(needs, floors, strict=True))
    room = budget_w - sum(floors)
    if extra_needed >= room:
        frac = room / extra_needed if extra_needed > 0 else 0.0
        return Split(tuple(f + frac * (n - f) for n, f in zip(needs, floors, strict=True)), True)
    shares = list(needs)
    left = budget_w - sum(shares)
    # Spread the rest by GPU count, never past a deployment's ceiling (water-filling).
    open_ = [i for i, c in enumerate(claims) if shares[i] < c.ceiling_w]
    while left > 1e-9 and open_:
        gpus = sum(claims[i].num_gpus for i in open_)
        given = 0.0
        for i in list(open_):
            add = min(left * claims[i].num_gpus / gpus, claims[i].ceiling_w - shares[i])
            shares[i] += add
            given += add
            if shares[i] >= claims[i].ceiling_w - 1e-9:
                open_.remove(i)
        left -= given
        if given <= 1e-12:
            break
    return Split(tuple(shares), True)
