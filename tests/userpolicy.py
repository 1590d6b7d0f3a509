"""A user policy loaded by dotted path in the tests: alternates the power cap every few periods."""

from __future__ import annotations

from typing import ClassVar

from sim.control import Action, ControllerContext, Observation


class AlternatingCap:
    """Switch every GPU between the low and high caps given in ``params`` every ``every`` periods."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.n = ctx.num_gpus
        self.low = float(ctx.params.get("low", ctx.power_limit_range_w[0]))
        self.high = float(ctx.params.get("high", ctx.power_limit_range_w[1]))
        self.every = int(ctx.params.get("every", 3))
        self.batch = int(ctx.params.get("max_num_seqs", ctx.max_num_seqs))
        self.calls = 0

    def decide(self, obs: Observation) -> Action:
        """Alternate caps; keep the batch knob."""
        self.calls += 1
        cap = self.low if (self.calls // self.every) % 2 else self.high
        return Action(tuple([cap] * self.n), self.batch)


class Recorder:
    """Keeps a fixed action and records every observation (in ``Recorder.seen``, newest run only)."""

    seen: ClassVar[list[Observation]] = []

    def __init__(self, ctx: ControllerContext) -> None:
        Recorder.seen = []
        self.action = Action(tuple([ctx.default_power_limit_w] * ctx.num_gpus), ctx.max_num_seqs)

    def decide(self, obs: Observation) -> Action:
        """Record, then keep the action."""
        Recorder.seen.append(obs)
        return self.action
