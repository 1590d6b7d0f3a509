"""From a validated scenario to the parts a plant needs: models, GPUs, physics, budget schedule.

Checks that need the catalog (model and GPU names, memory fit, cap range, files) live here and raise
``ScenarioError`` naming the scenario file and the field.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sim.catalog.calibration import engine_params
from sim.catalog.fused_moe import runs_default_moe_config
from sim.catalog.gpus import GpuSpec, UnknownGpuError, get_gpu
from sim.catalog.models import ModelConfigError, ModelSpec, load_model
from sim.engine import kv_capacity_tokens
from sim.physics import EngineOverheads, Parallelism, ReplicaPhysics, default_cuda_graph_max_tokens
from sim.routing import ExpertPopularity
from sim.scenario import DeploymentConfig, EngineConfig, Scenario, ScenarioError, TraceWorkload


@dataclass(frozen=True)
class BudgetSchedule:
    """A piecewise-constant power budget (W) over time; ``inf`` when none is set."""

    times_s: tuple[float, ...]
    watts: tuple[float, ...]

    def at(self, t: float) -> float:
        """Budget in force at time ``t``."""
        if not self.times_s:
            return math.inf
        i = bisect.bisect_right(self.times_s, t) - 1
        return self.watts[max(i, 0)]


def resolve_model(scenario: Scenario, dep: DeploymentConfig) -> ModelSpec:
    """The deployment's model, from the catalog, a config.json path (relative to the scenario) or inline."""
    ref = dep.model
    if isinstance(ref, str) and (ref.endswith(".json") or "/" in ref):
        ref = str(scenario.resolve_path(ref))
    return load_model(ref, name=dep.model if isinstance(dep.model, str) else None)


def build_physics(scenario: Scenario, dep: DeploymentConfig, gpu: GpuSpec | None = None,
                  model: ModelSpec | None = None) -> ReplicaPhysics:
    """The step-time and power model of one replica of ``dep``."""
    model = model or resolve_model(scenario, dep)
    gpu = gpu or get_gpu(dep.gpu)
    par = Parallelism(dep.parallelism.tensor, dep.parallelism.data, dep.parallelism.expert)
    popularity = None
    if model.is_moe:
        r = dep.expert_routing
        if r.kind == "zipf":
            popularity = ExpertPopularity.zipf(model.num_experts, model.experts_per_token, r.exponent)
        elif r.kind == "measured":
            popularity = ExpertPopularity.from_counts_csv(scenario.resolve_path(r.path or ""), r.model or "",
                                                          r.layer, model.experts_per_token)
            if popularity.num_experts != model.num_experts:
                raise ValueError(f"counts for {r.model!r} cover {popularity.num_experts} experts, the model has "
                                 f"{model.num_experts}")
    return ReplicaPhysics(model, gpu, par, engine_overheads(dep, gpu.name), popularity,
                          cuda_graph_max_tokens=cuda_graph_max_tokens(dep.engine),
                          default_moe_config=deployment_runs_default_moe_config(dep, model, gpu.name))


def deployment_runs_default_moe_config(dep: DeploymentConfig, model: ModelSpec, gpu_name: str) -> bool:
    """Whether the deployment's experts run vLLM's default fused-MoE config: its setting, else the catalog's
    knowledge of vLLM's tuned files."""
    setting = dep.engine.fused_moe_config
    if setting != "auto":
        return setting == "default" and model.is_moe
    p = dep.parallelism
    return runs_default_moe_config(model, gpu_name, p.tensor, p.data, p.expert)


def cuda_graph_max_tokens(engine: EngineConfig) -> int:
    """Largest step the engine replays as a CUDA graph: its setting, else vLLM's default."""
    if engine.cuda_graph_max_tokens is not None:
        return engine.cuda_graph_max_tokens
    return default_cuda_graph_max_tokens(engine.max_num_seqs)


def engine_overheads(dep: DeploymentConfig, gpu_name: str) -> EngineOverheads:
    """The deployment's engine overheads: its own settings, else those calibrated for the GPU, else defaults."""
    e = dep.engine
    given = {"step_s": e.step_overhead_s, "per_seq_s": e.per_seq_overhead_s,
             "per_request_s": e.per_request_overhead_s, "layer_latency_s": e.layer_latency_s}
    merged = {**engine_params(gpu_name), **{k: v for k, v in given.items() if v is not None}}
    return EngineOverheads(**merged)


def max_model_len(dep: DeploymentConfig, model: ModelSpec) -> int:
    """Longest prompt + output a replica accepts."""
    return dep.engine.max_model_len or model.max_position_embeddings


def num_nodes(scenario: Scenario) -> int:
    """Nodes the scenario's GPUs fill (each deployment on whole nodes)."""
    per = scenario.power.gpus_per_node
    return sum(math.ceil(d.replicas * d.parallelism.tensor * d.parallelism.data / per) for d in scenario.deployments)


def load_budget(scenario: Scenario) -> BudgetSchedule:
    """The scenario's budget on total GPU power, as a schedule (CSV files: columns at_s,w).

    A budget on system power (``power.budget_applies_to: system``) becomes the GPU power it leaves:
    ``(budget - nodes x node_overhead_w) / node_power_factor``.
    """
    raw = _raw_budget(scenario)
    p = scenario.power
    if p.budget_applies_to == "gpu" or not raw.times_s:
        return raw
    overhead = num_nodes(scenario) * p.node_overhead_w
    return BudgetSchedule(raw.times_s, tuple(max(0.0, (w - overhead) / p.node_power_factor) for w in raw.watts))


def _raw_budget(scenario: Scenario) -> BudgetSchedule:
    b = scenario.power.budget_w
    if b is None:
        return BudgetSchedule((), ())
    if isinstance(b, float | int):
        return BudgetSchedule((0.0,), (float(b),))
    if isinstance(b, list):
        return BudgetSchedule(tuple(p.at_s for p in b), tuple(p.w for p in b))
    path = scenario.resolve_path(b)
    if not path.is_file():
        raise ScenarioError(f"power.budget_w: budget file not found: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ScenarioError(f"{path}: not a readable CSV ({exc})") from None
    if list(df.columns[:2]) != ["at_s", "w"]:
        raise ScenarioError(f"{path}: expected columns at_s,w; got {','.join(map(str, df.columns))}")
    t = pd.to_numeric(df["at_s"], errors="coerce")
    w = pd.to_numeric(df["w"], errors="coerce")
    for i in range(len(df)):
        if not (t.iloc[i] >= 0) or not (w.iloc[i] > 0):
            raise ScenarioError(f"{path}: line {i + 2}: expected at_s >= 0 and w > 0, got "
                                f"{df['at_s'].iloc[i]!r},{df['w'].iloc[i]!r}")
        if i and t.iloc[i] <= t.iloc[i - 1]:
            raise ScenarioError(f"{path}: line {i + 2}: at_s must increase ({t.iloc[i]} after {t.iloc[i - 1]})")
    if df.empty or t.iloc[0] != 0:
        raise ScenarioError(f"{path}: the schedule must start with at_s = 0")
    return BudgetSchedule(tuple(float(x) for x in t), tuple(float(x) for x in w))


def check_scenario(scenario: Scenario, source: str) -> None:
    """Catalog and file checks; raises ``ScenarioError`` naming ``source`` and the field."""
    for i, dep in enumerate(scenario.deployments):
        where = f"{source}: deployments.{i}"
        try:
            gpu = get_gpu(dep.gpu)
        except UnknownGpuError as exc:
            raise ScenarioError(f"{where}.gpu: {exc}") from None
        try:
            model = resolve_model(scenario, dep)
        except ModelConfigError as exc:
            raise ScenarioError(f"{where}.model: {exc}") from None
        tp = dep.parallelism.tensor
        if model.num_heads % tp:
            raise ScenarioError(f"{where}.parallelism.tensor: {model.name} has {model.num_heads} attention heads, "
                                f"not divisible by tensor={tp}")
        if dep.parallelism.expert and model.is_moe:
            ranks = tp * dep.parallelism.data
            if model.num_experts % ranks:
                raise ScenarioError(f"{where}.parallelism: {model.num_experts} experts cannot be spread evenly over "
                                    f"{ranks} expert-parallel ranks")
        if dep.expert_routing.kind == "measured":
            p = scenario.resolve_path(dep.expert_routing.path or "")
            if not p.is_file():
                raise ScenarioError(f"{where}.expert_routing.path: file not found: {p}")
        try:
            phys = build_physics(scenario, dep, gpu, model)
        except (ValueError, KeyError) as exc:
            raise ScenarioError(f"{where}.expert_routing: {exc}") from None
        try:
            kv_capacity_tokens(phys, dep.engine.gpu_memory_utilization, dep.engine.max_num_batched_tokens)
        except ValueError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        cap = scenario.control.power_cap_w
        if cap is not None and not gpu.power_limit_min_w <= cap <= gpu.power_limit_max_w:
            raise ScenarioError(f"{source}: control.power_cap_w: {cap:g} W is outside {gpu.name}'s power-limit "
                                f"range {gpu.power_limit_min_w:g}-{gpu.power_limit_max_w:g} W")
        if isinstance(dep.workload, TraceWorkload):
            p = scenario.resolve_path(dep.workload.path)
            if not Path(p).is_file():
                raise ScenarioError(f"{where}.workload.path: trace file not found: {p}")
    knob = scenario.control.max_num_seqs
    for i, dep in enumerate(scenario.deployments):
        if knob is not None and knob > dep.engine.max_num_seqs:
            raise ScenarioError(f"{source}: control.max_num_seqs: {knob} is above deployments.{i}.engine.max_num_seqs "
                                f"= {dep.engine.max_num_seqs} (the knob moves within the engine's limit)")
    from sim.control.base import ControllerError, resolve_policy

    try:
        resolve_policy(scenario.control.policy)
    except ControllerError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    load_budget(scenario)
