"""The controller contract and the policies.

A controller is plant-agnostic: every ``period_s`` the plant (simulated or real) hands it an
``Observation`` of one deployment and applies the ``Action`` it returns. A policy keeps its own state but
never touches the plant. Policies are found by registered name or by ``module:Class``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sim.errors import PalsError

if TYPE_CHECKING:
    from sim.control.models import PerformanceModel


class ControllerError(PalsError):
    """A policy that cannot be found or built."""


@dataclass(frozen=True)
class Observation:
    """What a controller sees of one deployment at the end of a control window."""

    time_s: float
    window_s: float
    deployment: str
    output_tokens_per_s: float  # measured over the window, whole deployment
    gpu_power_w: tuple[float, ...]  # average over the window, per GPU
    power_cap_w: tuple[float, ...]  # limit in force, per GPU
    power_limit_range_w: tuple[float, float]
    max_num_seqs: int  # batch knob in force
    queue_len: int  # requests waiting
    running: int  # requests running
    ttft_p50_s: float  # requests that got their first token in the window (nan: none)
    tpot_p50_s: float  # requests that finished in the window (nan: none)
    budget_w: float  # this deployment's share of the power budget (inf: none)
    throughput_target_tokens_per_s: float = math.nan  # nan: no target
    # The whole scenario's budget in force from now on (inf: none; nan: not given, budget_w is the whole budget).
    # A share can move while it stays put: the coordinator shifting power between deployments.
    scenario_budget_w: float = math.nan


@dataclass(frozen=True)
class Action:
    """Per-GPU power caps (W) and the batch knob."""

    power_cap_w: tuple[float, ...]
    max_num_seqs: int


@runtime_checkable
class Controller(Protocol):
    """A control policy."""

    def decide(self, obs: Observation) -> Action:
        """Return the action to apply for the next window."""


@dataclass
class ControllerContext:
    """What a policy is built with: its deployment's static facts and the scenario's control settings."""

    deployment: str
    num_gpus: int
    power_limit_range_w: tuple[float, float]
    default_power_limit_w: float
    max_num_seqs: int  # the engine's configured maximum
    period_s: float
    power_cap_w: float | None
    control_max_num_seqs: int | None
    params: dict[str, Any] = field(default_factory=dict)
    model: PerformanceModel | None = None  # offline model of this deployment (None: the policy needs none)


class StaticController:
    """A fixed power cap and batch knob (the paper's baseline), applied every period."""

    def __init__(self, ctx: ControllerContext) -> None:
        cap = ctx.power_cap_w if ctx.power_cap_w is not None else ctx.default_power_limit_w
        self._action = Action(tuple([float(cap)] * ctx.num_gpus), int(ctx.control_max_num_seqs or ctx.max_num_seqs))

    def decide(self, obs: Observation) -> Action:
        """Always the same action."""
        return self._action


def _registry() -> dict[str, type]:
    from sim.control.policies import BatchOnlyController, CapOnlyController, OracleController, PalsController

    return {"static": StaticController, "batch-only": BatchOnlyController, "cap-only": CapOnlyController,
            "pals": PalsController, "oracle": OracleController}


POLICY_NAMES = ("static", "batch-only", "cap-only", "pals", "oracle")


def resolve_policy(policy: str) -> type:
    """The class behind a registered policy name or a ``module:Class`` path."""
    cls = _registry().get(policy)
    if cls is not None:
        return cls
    if ":" not in policy:
        raise ControllerError(f"control.policy: unknown policy {policy!r}; expected one of "
                              f"{', '.join(POLICY_NAMES)} or module:Class")
    mod_name, _, cls_name = policy.partition(":")
    if not mod_name or mod_name.startswith(".") or not cls_name:
        raise ControllerError(f"control.policy: {policy!r}: expected module:Class with an absolute module path "
                              "(e.g. mypolicies:Greedy, importable from the current folder or PYTHONPATH)")
    try:
        return getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ControllerError(f"control.policy: cannot load {policy!r}: {exc}") from None


def build_controller(policy: str, ctx: ControllerContext) -> Controller:
    """Instantiate a registered policy or a ``module:Class`` one (constructed with the context)."""
    cls = resolve_policy(policy)
    try:
        ctrl = cls(ctx)
    except (TypeError, ValueError) as exc:
        raise ControllerError(f"control.policy: {policy!r} could not be built: {exc}") from None
    if not callable(getattr(ctrl, "decide", None)):
        raise ControllerError(f"control.policy: {policy!r} has no decide(observation) method")
    return ctrl
