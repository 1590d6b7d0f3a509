"""The control policies: static, batch-only, cap-only, pals and oracle.

All but ``static`` choose from a grid of candidates (power caps over the GPU's range in ``cap_step_w``
steps × batch sizes 1, 2, 4, … up to the engine's ``max_num_seqs``) with an offline model:

* with a throughput target, the candidate with the highest tokens/J among those predicted to meet the
  target (PID-corrected) within the budget share; if none meets it, the highest throughput within budget;
* without a target, the highest throughput within the budget share when a budget is set, else the highest
  tokens/J.

``pals`` chooses cap and batch jointly; ``batch-only`` keeps the cap fixed; ``cap-only`` keeps the batch
fixed (and, without a target, tracks the budget share with its cap). Policies aim ``target_margin`` (10 %)
above the target, since the QoS metric counts control windows below it. A new configuration is applied only
when the throughput error stays beyond 5 % for ``persist_periods`` periods, or at once when the budget or
the target changes. ``oracle`` searches the same grid every period, each candidate measured by simulating the
plant itself (perfect knowledge), with no feedback or hysteresis: the upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.control.base import Action, ControllerContext, Observation
from sim.control.models import PerformanceModel, Prediction
from sim.control.pid import Hysteresis, Pid


@dataclass(frozen=True)
class Choice:
    """A configuration and what the model predicts for it."""

    power_cap_w: float
    max_num_seqs: int
    prediction: Prediction


def cap_candidates(lo_w: float, hi_w: float, step_w: float) -> list[float]:
    """Caps from ``lo_w`` to ``hi_w`` in ``step_w`` steps (both ends included)."""
    n = math.floor((hi_w - lo_w) / step_w + 1e-9)
    caps = [lo_w + i * step_w for i in range(n + 1)]
    if caps[-1] < hi_w:
        caps.append(hi_w)
    return caps


def batch_candidates(max_num_seqs: int) -> list[int]:
    """1, 2, 4, … and ``max_num_seqs`` itself."""
    out = []
    b = 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    out.append(max_num_seqs)
    return out


def choose(model: PerformanceModel, caps: list[float], batches: list[int], num_gpus: int, target: float,
           cap_limit_w: float) -> Choice:
    """The policy rule over a candidate grid (see the module docstring).

    Caps above ``cap_limit_w`` (the per-GPU budget share) are excluded, and the limit itself is a candidate
    when it falls inside the grid's range (so a budget is used to the watt); if nothing fits, the lowest cap.
    """
    allowed = [c for c in caps if c <= cap_limit_w + 1e-9] or [min(caps)]
    if min(caps) < cap_limit_w < max(caps) and cap_limit_w not in allowed:
        allowed.append(cap_limit_w)
    grid = [Choice(c, b, model.predict(c, b)) for c in allowed for b in batches]
    if not math.isnan(target):
        meeting = [x for x in grid if x.prediction.tokens_per_s >= target]
        if meeting:
            return max(meeting, key=lambda x: (x.prediction.tokens_per_j(num_gpus), x.prediction.tokens_per_s))
        return max(grid, key=lambda x: (x.prediction.tokens_per_s, -x.power_cap_w))
    if math.isfinite(cap_limit_w):
        return max(grid, key=lambda x: (x.prediction.tokens_per_s, -x.power_cap_w))
    return max(grid, key=lambda x: (x.prediction.tokens_per_j(num_gpus), x.prediction.tokens_per_s))


class _ModelPolicy:
    """Shared machinery: candidates, PID-corrected target, hysteresis, reconfiguration on budget/target change."""

    joint_cap = True
    joint_batch = True
    uses_feedback = True

    def __init__(self, ctx: ControllerContext) -> None:
        if ctx.model is None:
            raise ValueError(f"{type(self).__name__} needs an offline model")
        self.ctx = ctx
        self.model = ctx.model
        p = ctx.params
        lo, hi = ctx.power_limit_range_w
        self.fixed_cap = float(ctx.power_cap_w if ctx.power_cap_w is not None else ctx.default_power_limit_w)
        self.fixed_batch = int(ctx.control_max_num_seqs or ctx.max_num_seqs)
        self.caps = cap_candidates(lo, hi, float(p.get("cap_step_w", 25.0))) if self.joint_cap else [self.fixed_cap]
        self.batches = batch_candidates(ctx.max_num_seqs) if self.joint_batch else [self.fixed_batch]
        self.pid = Pid(kp=float(p.get("kp", 0.5)), ki=float(p.get("ki", 0.2)), kd=float(p.get("kd", 0.0)))
        self.hysteresis = Hysteresis(float(p.get("error_threshold", 0.05)), int(p.get("persist_periods", 3)))
        # Aim above the target: the QoS metric counts windows below it, and window throughput fluctuates.
        self.margin = float(p.get("target_margin", 0.10))
        # Window throughput is bursty (static batches finish in lumps): the error uses an EWMA of it.
        self.smoothing = float(p.get("smoothing", 0.3))
        self.smoothed = math.nan
        self.correction = 1.0
        self.action: Action | None = None
        self._budget = math.nan
        self._whole = math.nan
        self._target = math.nan

    def _decide_cap_limit(self, obs: Observation) -> float:
        return obs.budget_w / self.ctx.num_gpus if math.isfinite(obs.budget_w) else math.inf

    def _configure(self, obs: Observation) -> Action:
        target = obs.throughput_target_tokens_per_s * (1.0 + self.margin) * self.correction
        c = choose(self.model, self.caps, self.batches, self.ctx.num_gpus, target, self._decide_cap_limit(obs))
        return Action(tuple([c.power_cap_w] * self.ctx.num_gpus), c.max_num_seqs)

    def decide(self, obs: Observation) -> Action:
        """Keep, or reconfigure when the budget or target changed or the error persisted.

        A new scenario budget or target starts afresh (the feedback learnt under the old one is dropped); a share
        the coordinator moved between deployments under the same budget only re-plans, keeping the feedback: the
        shares follow the corrections, so forgetting them would move the shares back, and so on."""
        target = obs.throughput_target_tokens_per_s
        whole = obs.budget_w if math.isnan(obs.scenario_budget_w) else obs.scenario_budget_w
        changed = self.action is None or not _same(whole, self._whole) or not _same(target, self._target)
        share_moved = not _same(obs.budget_w, self._budget)
        self._budget, self._whole, self._target = obs.budget_w, whole, target
        if changed:
            self.pid.reset()
            self.correction = 1.0
            self.hysteresis.count = 0
            self.smoothed = math.nan
            self.action = self._configure(obs)
            return self.action
        if share_moved:
            self.action = self._configure(obs)
        if self.uses_feedback and not math.isnan(target) and target > 0 and obs.window_s > 0:
            a = self.smoothing
            self.smoothed = (obs.output_tokens_per_s if math.isnan(self.smoothed)
                             else a * obs.output_tokens_per_s + (1.0 - a) * self.smoothed)
            aim = target * (1.0 + self.margin)
            error = (aim - self.smoothed) / aim
            self.correction = self.pid.update(error, obs.window_s)
            if self.hysteresis.update(error):
                self.action = self._configure(obs)
        return self.action


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


class PalsController(_ModelPolicy):
    """PALS: power cap and batch chosen jointly by the offline model, corrected by a PID, with hysteresis."""


class BatchOnlyController(_ModelPolicy):
    """A fixed power cap; the batch knob chosen by the model."""

    joint_cap = False


class CapOnlyController(_ModelPolicy):
    """A fixed batch knob; the cap chosen by the model for the target, or tracking the budget share."""

    joint_batch = False

    def _configure(self, obs: Observation) -> Action:
        if math.isnan(obs.throughput_target_tokens_per_s):
            lo, hi = self.ctx.power_limit_range_w
            cap = min(hi, max(lo, self._decide_cap_limit(obs)))
            return Action(tuple([cap] * self.ctx.num_gpus), self.fixed_batch)
        return super()._configure(obs)


class OracleController(_ModelPolicy):
    """Exhaustive search of the grid every period with a model that measures the plant itself (the plant
    builds it a ``SimulatedModel``); no feedback, no hysteresis."""

    uses_feedback = False

    def decide(self, obs: Observation) -> Action:
        """The best configuration for this period's budget and target."""
        self.action = self._configure(obs)
        return self.action
