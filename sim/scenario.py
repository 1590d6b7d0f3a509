"""The scenario schema (pydantic v2): what is served, on what, under which power budget, by which controller.

Load with ``load_scenario(path, overrides)``; every error names the file, the field path and what is
expected. Relative file paths inside a scenario (traces, budget CSVs, model configs) are resolved against
the scenario file's folder.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import PalsError

WORKLOAD_KINDS = ("poisson", "gamma", "closed-loop", "static-batches", "trace")


class ScenarioError(PalsError):
    """A scenario that cannot be loaded or is inconsistent."""


MAX_ARRIVAL_CV = 100.0  # beyond this a Gamma process is one burst and long silences, and its gaps underflow


class _Model(BaseModel):
    # Every number is finite: ``.inf`` or ``.nan`` in a YAML file is a mistake, not "no limit" (limits say so
    # with ``null`` where they are optional).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ----- token-count distributions ------------------------------------------------------------------------
class ConstantTokens(_Model):
    """Every request has the same number of tokens."""

    dist: Literal["constant"] = "constant"
    value: int = Field(gt=0, description="Tokens per request.")


class LognormalTokens(_Model):
    """Log-normal token counts, rounded, clipped to [min, max]."""

    dist: Literal["lognormal"] = "lognormal"
    median: float = Field(gt=0, description="Median tokens (exp of the log-mean).")
    sigma: float = Field(ge=0, description="Standard deviation of log(tokens).")
    min: int = Field(1, ge=1, description="Lower clip.")
    max: int = Field(1_000_000, ge=1, description="Upper clip.")

    @model_validator(mode="after")
    def _check(self) -> LognormalTokens:
        if self.min > self.max:
            raise ValueError(f"min={self.min} exceeds max={self.max}")
        return self


class UniformTokens(_Model):
    """Integer token counts uniform on [low, high]."""

    dist: Literal["uniform"] = "uniform"
    low: int = Field(ge=1, description="Smallest count.")
    high: int = Field(ge=1, description="Largest count.")

    @model_validator(mode="after")
    def _check(self) -> UniformTokens:
        if self.low > self.high:
            raise ValueError(f"low={self.low} exceeds high={self.high}")
        return self


TokenDist = Annotated[ConstantTokens | LognormalTokens | UniformTokens, Field(discriminator="dist")]


def _int_to_constant(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"dist": "constant", "value": v}
    return v


# ----- workloads -----------------------------------------------------------------------------------------
class _Generated(_Model):
    prompt_tokens: TokenDist = Field(description="Prompt length distribution (or an integer).")
    output_tokens: TokenDist = Field(description="Output length distribution (or an integer).")
    requests: int | None = Field(None, gt=0, description="Stop after this many requests (None: until duration_s).")

    _coerce = field_validator("prompt_tokens", "output_tokens", mode="before")(_int_to_constant)


class PoissonWorkload(_Generated):
    """Open loop, exponential inter-arrival times."""

    kind: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(gt=0, description="Mean arrival rate (requests/s).")


class GammaWorkload(_Generated):
    """Open loop, Gamma inter-arrival times: bursty when cv > 1."""

    kind: Literal["gamma"] = "gamma"
    rate_per_s: float = Field(gt=0, description="Mean arrival rate (requests/s).")
    cv: float = Field(gt=0, le=MAX_ARRIVAL_CV, description="Coefficient of variation of inter-arrival times "
                                                          "(1 = Poisson; at most 100).")


class ClosedLoopWorkload(_Generated):
    """A fixed number of clients; each sends a request, waits for it, thinks, and sends the next."""

    kind: Literal["closed-loop"] = "closed-loop"
    clients: int = Field(gt=0, description="Concurrent clients.")
    think_time_s: float = Field(0.0, ge=0, description="Mean think time between a response and the next request "
                                                        "(exponential; 0 = none).")


class StaticBatchesWorkload(_Generated):
    """Closed batches: ``batch_size`` prompts arrive together; the next batch when the previous has finished.

    This is how the PALS A100 data was measured (``LLM.generate`` on a list of prompts).
    """

    kind: Literal["static-batches"] = "static-batches"
    batch_size: int = Field(gt=0, description="Prompts per batch.")


class TraceWorkload(_Model):
    """Replay of a request trace."""

    kind: Literal["trace"] = "trace"
    path: str = Field(description="Trace file (relative paths: from the scenario's folder).")
    format: Literal["azure", "mooncake", "csv"] = Field(
        description="azure: TIMESTAMP,ContextTokens,GeneratedTokens; mooncake: JSONL timestamp (ms), "
                    "input_length, output_length; csv: arrival_s,prompt_tokens,output_tokens.")
    time_scale: float = Field(1.0, gt=0, description="Multiply arrival times by this (0.5 = twice the rate).")
    requests: int | None = Field(None, gt=0, description="Replay only the first N requests.")


Workload = Annotated[
    PoissonWorkload | GammaWorkload | ClosedLoopWorkload | StaticBatchesWorkload | TraceWorkload,
    Field(discriminator="kind"),
]


# ----- deployment ---------------------------------------------------------------------------------------
class ParallelismConfig(_Model):
    """How one replica is split over GPUs, as in vLLM."""

    tensor: int = Field(1, ge=1, description="Tensor-parallel size (--tensor-parallel-size).")
    data: int = Field(1, ge=1, description="Data-parallel attention ranks inside one replica (needs expert: true).")
    expert: bool = Field(False, description="Expert parallelism over the tensor x data ranks "
                                            "(--enable-expert-parallel).")


class EngineConfig(_Model):
    """vLLM-like engine settings."""

    max_num_seqs: int = Field(256, ge=1, description="Most sequences in a running batch (the batch knob).")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one step (chunked prefill).")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may use.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt + output (None: the model's limit).")
    stepping: Literal["event", "iteration"] = Field(
        "event", description="event: one simulation event per composition change (fast); iteration: one per "
                             "engine step (reference).")
    step_overhead_s: float | None = Field(
        None, ge=0, description="Host time per engine step (scheduling, launch); None: the value calibrated for "
                                "the GPU (traces/calibration), else 0.002.")
    per_seq_overhead_s: float | None = Field(
        None, ge=0, description="Host time per running sequence per step; None: calibrated, else 2e-5.")
    per_request_overhead_s: float | None = Field(
        None, ge=0, description="Host time per newly admitted request (tokenisation, set-up); None: calibrated, "
                                "else 0.")
    layer_latency_s: float | None = Field(
        None, ge=0, description="GPU time per layer per step at the max clock beyond the roofline (kernel launch "
                                "gaps, small kernels; scales with 1/clock); None: calibrated, else 0.")
    cuda_graph_max_tokens: int | None = Field(
        None, ge=0, description="Largest step, in tokens, replayed as a captured CUDA graph; a larger step launches "
                                "its kernels one by one from the host (eager). None: vLLM's default, "
                                "min(2 x max_num_seqs, 512); 0: no graphs (enforce_eager).")
    fused_moe_config: Literal["auto", "tuned", "default"] = Field(
        "auto", description="MoE models: the fused-MoE kernel configuration vLLM runs the experts with. tuned: a "
                            "tuned file for the layer's shape on this GPU; default: none (vLLM logs 'Using default "
                            "MoE config'), its partly empty tiles stream expert weights slower; auto: as the catalog "
                            "knows vLLM's tuned files (sim/catalog/fused_moe.py).")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                             f"max_num_seqs={self.max_num_seqs} (every running sequence needs a token per step)")
        return self


class ExpertRoutingConfig(_Model):
    """Popularity of routed experts (MoE only)."""

    kind: Literal["uniform", "zipf", "measured"] = Field("uniform", description="Popularity model.")
    exponent: float = Field(1.0, ge=0, description="Zipf exponent (kind: zipf).")
    path: str | None = Field(None, description="CSV of counts: model, layer, expert, count (kind: measured).")
    model: str | None = Field(None, description="Value of the CSV's model column (kind: measured).")
    layer: int = Field(0, ge=0, description="Value of the CSV's layer column (kind: measured).")

    @model_validator(mode="after")
    def _check(self) -> ExpertRoutingConfig:
        if self.kind == "measured" and (not self.path or not self.model):
            raise ValueError("kind: measured needs path and model")
        return self


class SloConfig(_Model):
    """Latency objectives; a request meets its SLO when both hold."""

    ttft_s: float | None = Field(None, gt=0, description="Time to first token objective (None: none).")
    tpot_s: float | None = Field(None, gt=0, description="Time per output token objective, after the first "
                                                         "(None: none).")


class ThroughputTarget(_Model):
    """The output throughput a deployment must keep (controllers see it; QoS violations count against it)."""

    tokens_per_s: float | None = Field(None, gt=0, description="Absolute target, output tokens/s (deployment).")
    fraction_of_max: float | None = Field(None, gt=0, le=1, description="Target as a fraction of the throughput "
                                          "the offline model predicts at the max cap and max batch.")

    @model_validator(mode="after")
    def _one(self) -> ThroughputTarget:
        if (self.tokens_per_s is None) == (self.fraction_of_max is None):
            raise ValueError("give exactly one of tokens_per_s and fraction_of_max")
        return self


class DeploymentConfig(_Model):
    """One model served by identical replicas behind a router."""

    name: str = Field(min_length=1, description="Deployment name (unique).")
    model: str | dict[str, Any] = Field(description="Catalog name, path to a Hugging Face config.json, or an "
                                                    "inline mapping of config fields.")
    gpu: str = Field(description="GPU catalog name.")
    replicas: int = Field(1, ge=1, description="Identical engine replicas.")
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    workload: Workload
    slo: SloConfig = Field(default_factory=SloConfig)
    router: Literal["least-loaded", "round-robin"] = Field("least-loaded", description="Replica choice per request.")
    expert_routing: ExpertRoutingConfig = Field(default_factory=ExpertRoutingConfig)
    throughput_target: ThroughputTarget | None = Field(None, description="Throughput to keep (None: none).")

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if self.parallelism.data > 1 and not self.parallelism.expert:
            raise ValueError(f"parallelism.data={self.parallelism.data} needs parallelism.expert: true "
                             "(without expert parallelism, use replicas for data parallelism)")
        return self


# ----- power and control --------------------------------------------------------------------------------
class BudgetPoint(_Model):
    """The budget from ``at_s`` on."""

    at_s: float = Field(ge=0, description="Start time (s).")
    w: float = Field(gt=0, description="Total GPU power budget (W).")


class PowerConfig(_Model):
    """The power budget and how caps are actuated."""

    budget_w: float | list[BudgetPoint] | str | None = Field(
        None, description="Budget on the total GPU power of the scenario: a number (W), a schedule "
                          "[{at_s, w}, ...], or a CSV path with columns at_s,w. None: no budget.")
    cap_actuation_delay_s: float = Field(0.1, ge=0, description="Delay between setting a cap and its effect.")
    split: Literal["need", "even"] = Field(
        "need", description="How a budget is shared between deployments: need = first what each needs for its "
                            "throughput target (offline model), the rest by GPU count; even = by GPU count.")
    budget_applies_to: Literal["gpu", "system"] = Field(
        "gpu", description="gpu: budget_w bounds the total GPU power; system: it bounds node power "
                           "(node_power_factor x GPU power + node_overhead_w per node), as in the PALS cluster "
                           "experiments.")
    gpus_per_node: int = Field(8, ge=1, description="GPUs per node, for system power.")
    node_power_factor: float = Field(1.05, gt=0, description="System power = factor x GPU power + overhead per node "
                                                             "(PALS: 1.05).")
    node_overhead_w: float = Field(345.0, ge=0, description="Per-node power besides the GPUs (PALS: 340-350 W).")

    @field_validator("budget_w", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        if v is None or isinstance(v, str | list):
            return v
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("expected a number (W), a list of {at_s, w}, or a CSV path")
        if not 0 < v < math.inf:  # NaN too: no budget is null, not .nan
            raise ValueError(f"budget must be a positive, finite number of watts (no budget: null), got {v}")
        return float(v)

    @field_validator("budget_w", mode="after")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("a budget schedule needs at least one point")
            times = [p.at_s for p in v]
            if times[0] != 0:
                raise ValueError(f"a budget schedule must start at at_s: 0, starts at {times[0]}")
            if any(b <= a for a, b in itertools.pairwise(times)):
                raise ValueError(f"budget schedule times must increase, got {times}")
        return v


class ControlConfig(_Model):
    """The controller and its period."""

    policy: str = Field("static", description="Registered policy name, or module:Class for a user policy.")
    period_s: float = Field(0.5, gt=0, description="Control period (s); telemetry is sampled at this period.")
    power_cap_w: float | None = Field(None, gt=0, description="Fixed per-GPU power cap of static and batch-only "
                                                              "(None: the GPU's default limit).")
    max_num_seqs: int | None = Field(None, ge=1, description="Fixed batch knob of static and cap-only (None: the "
                                                             "engine's max_num_seqs).")
    offline_model: Literal["physics", "random_forest"] = Field(
        "physics", description="What batch-only, cap-only and pals plan with: the simulator's physics in closed "
                               "form, or random forests (throughput, power) trained on a profile table, as in the "
                               "PALS paper.")
    profile_table: str | None = Field(
        None, description="random_forest: the profile table CSV it is trained on (relative to the scenario's "
                          "folder); its rows of each deployment's GPU, model, parallelism and workload style are "
                          "used. None: each deployment is first profiled in the simulator over caps every "
                          "profile_cap_step_w x batches 1, 2, 4, ... max_num_seqs.")
    profile_cap_step_w: float = Field(50.0, gt=0, description="Cap spacing of the simulated profile (W).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Policy parameters: cap_step_w (25), kp (0.5), ki (0.2), kd (0), "
                                          "error_threshold (0.05), persist_periods (3), target_margin (0.10), "
                                          "smoothing (0.3: EWMA weight of the newest window).")


class Scenario(_Model):
    """A complete simulation scenario."""

    name: str = Field(min_length=1, description="Scenario name.")
    seed: int = Field(0, ge=0, description="Seed of every random stream.")
    duration_s: float = Field(gt=0, description="Simulated time; the run ends earlier once a finite workload is "
                                                "fully served.")
    deployments: list[DeploymentConfig] = Field(min_length=1)
    power: PowerConfig = Field(default_factory=PowerConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    base_dir: str = Field(".", description="Folder that relative paths are resolved against (set by the loader).")

    @model_validator(mode="after")
    def _unique(self) -> Scenario:
        names = [d.name for d in self.deployments]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"deployment names must be unique, repeated: {', '.join(dup)}")
        return self

    def resolve_path(self, p: str) -> Path:
        """A path from the scenario, resolved against its folder."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


# ----- loading ------------------------------------------------------------------------------------------
_TAGS = set(WORKLOAD_KINDS) | {"constant", "lognormal", "uniform"}


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, str) and item in _TAGS and i > 0 and loc[i - 1] in (
                "workload", "prompt_tokens", "output_tokens"):
            continue  # discriminator tag, not a field
        if isinstance(item, str) and ("[" in item or item in ("float", "str", "int", "list")):
            continue  # union member names
        parts.append(str(item))
    return ".".join(parts) or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    seen = set()
    for err in exc.errors(include_url=False):
        loc = _loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        got = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.0.c=value`` into a path and a YAML-typed value."""
    if "=" not in text:
        raise ScenarioError(f"--set {text!r}: expected FIELD.PATH=VALUE")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ScenarioError(f"--set {text!r}: empty field name in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path] = value`` in place; list items by index."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ScenarioError(f"--set {'.'.join(path)}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ScenarioError(f"--set {'.'.join(path)}: {'.'.join(path[:i])} is a value, not a mapping or list")


def scenario_from_dict(data: Any, source: str = "<scenario>", base_dir: str | Path = ".") -> Scenario:
    """Validate a mapping as a scenario, then check it against the catalog."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a YAML mapping, got {type(data).__name__}")
    data = {**data, "base_dir": str(base_dir)}
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(format_validation_error(exc, source)) from None
    from sim.build import check_scenario  # catalog-dependent checks live with the builder

    check_scenario(scenario, source)
    return scenario


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents (``safe_load``); ``ScenarioError`` on text that is not UTF-8 or not YAML, naming
    the file and, for YAML, the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ScenarioError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', None) or exc}") from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Load a scenario YAML file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario must be a YAML mapping")
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return scenario_from_dict(data, str(path), path.parent)


def scenario_to_yaml(scenario: Scenario) -> str:
    """The resolved scenario as YAML (every default filled in, every file it reads as an absolute path, so that
    the YAML loads to the same scenario from wherever it is written)."""
    data = scenario.model_dump(mode="json", exclude={"base_dir"})

    def absolute(p: str) -> str:
        return str(scenario.resolve_path(p).resolve())

    for dep in data["deployments"]:
        if isinstance(dep["model"], str) and (dep["model"].endswith(".json") or "/" in dep["model"]):
            dep["model"] = absolute(dep["model"])  # a config.json (a catalog name stays a name)
        if dep["workload"]["kind"] == "trace":
            dep["workload"]["path"] = absolute(dep["workload"]["path"])
        if dep["expert_routing"].get("path"):
            dep["expert_routing"]["path"] = absolute(dep["expert_routing"]["path"])
    if isinstance(data["power"]["budget_w"], str):
        data["power"]["budget_w"] = absolute(data["power"]["budget_w"])
    if data["control"].get("profile_table"):
        data["control"]["profile_table"] = absolute(data["control"]["profile_table"])
    return yaml.safe_dump(data, sort_keys=False)
