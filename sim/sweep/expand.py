"""From a sweep spec to the exact, ordered list of runs, each with its resolved and validated scenario.

Order: the cartesian product of the axes in the order of the file — every grid key, then every zip group
(one axis each) — and the seeds, innermost; the last axis varies fastest. Every run's scenario is resolved
(field values applied in that order, then ``seed``, then the derived fields) and validated by the Scenario
schema and the catalog checks before anything runs, so a bad value is reported up front, naming the spec
file, the run and the field.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sim.catalog.gpus import UnknownGpuError, get_gpu
from sim.control.base import resolve_policy
from sim.errors import PalsError
from sim.scenario import (
    Scenario,
    ScenarioError,
    apply_override,
    format_validation_error,
    read_yaml,
    scenario_from_dict,
)
from sim.sweep.spec import SweepError, SweepSpec, load_spec


@dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    index: int
    key: str  # sha256 of the resolved scenario's canonical JSON (see ``scenario_key``)
    seed: int
    params: dict[str, Any]  # varied keys (fields and variables) and derived fields -> value
    overrides: tuple[str, ...]  # `pals run BASE --set ...` arguments that reproduce this run
    scenario: Scenario
    policy: str
    models: str  # the deployments' models, joined by "+"
    peak_power_w: float  # see ``peak_power_w``


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep."""

    name: str
    spec: SweepSpec
    spec_path: Path
    base_path: Path
    runs: list[Run]
    param_columns: list[str]  # varied keys, then derived fields
    budget_axis: str | None  # the budget level's column (see ``budget_axis``)
    budget_columns: tuple[str, ...] = field(default=())  # columns that move with the budget level


def scenario_key(scenario: Scenario) -> str:
    """A stable hash of a resolved scenario: sha256 of its canonical JSON (sorted keys, every default filled
    in, ``base_dir`` left out so that the key does not depend on where the files live)."""
    data = scenario.model_dump(mode="json", exclude={"base_dir"})
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def gpu_peak_power_w(scenario: Scenario) -> float:
    """Sum over every GPU of the scenario of its maximum power limit (W)."""
    return float(sum(d.replicas * d.parallelism.tensor * d.parallelism.data * get_gpu(d.gpu).power_limit_max_w
                     for d in scenario.deployments))


def peak_power_w(scenario: Scenario) -> float:
    """Peak power that the budget is compared with (W): the GPUs' summed maximum power limits, or for a budget on
    system power, ``node_power_factor`` x that sum + ``node_overhead_w`` per node."""
    gpu_w = gpu_peak_power_w(scenario)
    p = scenario.power
    if p.budget_applies_to == "gpu":
        return gpu_w
    nodes = sum(math.ceil(d.replicas * d.parallelism.tensor * d.parallelism.data / p.gpus_per_node)
                for d in scenario.deployments)
    return float(Fraction(repr(p.node_power_factor)) * Fraction(gpu_w) + Fraction(repr(p.node_overhead_w)) * nodes)


def _times(fraction: float, watts: float) -> float:
    """``fraction x watts`` computed exactly on the decimal values written (0.7 x 5600 = 3920.0, not 3919.99…)."""
    return float(Fraction(repr(float(fraction))) * Fraction(repr(float(watts))))


def _override_text(key: str, value: Any) -> str:
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label(params: dict[str, Any], seed: int) -> str:
    return ", ".join([*(f"{k}={v}" for k, v in params.items()), f"seed={seed}"])


def _models(scenario: Scenario) -> str:
    return "+".join(d.model if isinstance(d.model, str) else str(d.model.get("name", "inline"))
                    for d in scenario.deployments)


def budget_axis(spec: SweepSpec) -> tuple[str | None, tuple[str, ...]]:
    """The column giving the budget level, and every column that moves with it.

    The budget level is the variable feeding a ``fraction_of_peak`` derived field (a fraction of peak power),
    else ``power.budget_w`` when it is varied directly (W), else None. ``expand`` drops a ``power.budget_w`` axis
    whose values are not all numbers (``[null, 1000]``): it has no levels to plot against.
    """
    candidates = [(target != "power.budget_w", d.source) for target, d in spec.derived.items()
                  if d.kind == "fraction_of_peak" and isinstance(d.source, str)]
    if candidates:
        source = str(min(candidates)[1])  # the variable feeding power.budget_w first
        return source, (source, *(t for t, d in spec.derived.items() if d.source == source))
    if "power.budget_w" in spec.axis_keys():
        return "power.budget_w", ("power.budget_w",)
    return None, ()


def _derive(spec: SweepSpec, target: str, assignment: dict[str, Any], pre: Scenario, source: str) -> float:
    d = spec.derived[target]
    value = assignment[d.source] if isinstance(d.source, str) else d.source
    where = f"{source}: derived.{target}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SweepError(f"{where}: {d.kind} needs a positive number, got {value!r}"
                         + (f" (from {d.source})" if isinstance(d.source, str) else ""))
    if d.kind == "fraction_of_peak":
        return _times(value, peak_power_w(pre))
    gpus = {dep.gpu for dep in pre.deployments}
    if len(gpus) > 1:
        raise SweepError(f"{where}: fraction_of_gpu_max needs one GPU type, the scenario has {sorted(gpus)}")
    return _times(value, get_gpu(gpus.pop()).power_limit_max_w)


def _axes(spec: SweepSpec) -> list[list[dict[str, Any]]]:
    axes = [[{key: v} for v in values] for key, values in spec.grid.items()]
    for group in spec.zip:
        n = len(next(iter(group.values())))
        axes.append([{key: values[i] for key, values in group.items()} for i in range(n)])
    return axes


def _load_base(spec: SweepSpec, spec_path: Path) -> tuple[Path, dict[str, Any]]:
    base = Path(spec.base).expanduser()
    base = (base if base.is_absolute() else spec_path.parent / base).resolve()
    if not base.is_file():
        raise SweepError(f"{spec_path}: base: scenario file not found: {base}")
    try:
        data = read_yaml(base)
    except ScenarioError as exc:
        raise SweepError(f"{spec_path}: base: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{spec_path}: base: {base} is not a YAML mapping")
    try:
        scenario_from_dict(copy.deepcopy(data), str(base), base.parent)  # the base itself must be valid
    except PalsError as exc:
        raise SweepError(f"{spec_path}: base: {exc}") from None
    return base, data


def _resolve_one(spec: SweepSpec, base_data: dict[str, Any], base_dir: Path, assignment: dict[str, Any],
                 where: dict[str, str], seed: int, source: str) -> tuple[Scenario, dict[str, Any]]:
    variables = spec.variables()
    data = copy.deepcopy(base_data)
    for key, value in assignment.items():
        if key in variables:
            continue
        try:
            apply_override(data, key.split("."), copy.deepcopy(value))
        except PalsError as exc:
            raise SweepError(f"{source}: {where[key]}: {key}: not a field path of the base scenario "
                             f"({str(exc).removeprefix(f'--set {key}: ')})") from None
    data["seed"] = seed
    derived: dict[str, float] = {}
    if spec.derived:
        try:
            pre = Scenario.model_validate({**data, "base_dir": str(base_dir)})
        except ValidationError as exc:
            raise SweepError(format_validation_error(exc, source)) from None
        except UnknownGpuError as exc:
            raise SweepError(f"{source}: {exc}") from None
        for target in spec.derived:
            try:
                derived[target] = _derive(spec, target, assignment, pre, source)
            except UnknownGpuError as exc:
                raise SweepError(f"{source}: derived.{target}: {exc}") from None
            try:
                apply_override(data, target.split("."), derived[target])
            except PalsError as exc:
                raise SweepError(f"{source}: derived.{target}: not a field path of the base scenario "
                                 f"({str(exc).removeprefix(f'--set {target}: ')})") from None
    try:
        scenario = scenario_from_dict(data, source, base_dir)
        resolve_policy(scenario.control.policy)
    except SweepError:
        raise
    except PalsError as exc:  # scenario errors already name the source; the policy's does not
        raise SweepError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    return scenario, derived


def expand(spec: SweepSpec, spec_path: str | Path) -> Sweep:
    """Every run of the sweep, in order, each scenario resolved and validated (see the module docstring)."""
    spec_path = Path(spec_path)
    spec.check(str(spec_path))
    base_path, base_data = _load_base(spec, spec_path)
    seeds = spec.seeds if spec.seeds is not None else [int(base_data.get("seed", 0) or 0)]
    where = {k: "grid" for k in spec.grid} | {k: f"zip.{i}" for i, g in enumerate(spec.zip) for k in g}
    runs: list[Run] = []
    by_key: dict[str, int] = {}
    for combo in itertools.product(*_axes(spec), seeds):
        *parts, seed = combo
        assignment = {k: v for part in parts for k, v in part.items()}
        index = len(runs)
        source = f"{spec_path}: run {index} ({_label(assignment, seed)})"
        scenario, derived = _resolve_one(spec, base_data, base_path.parent, assignment, where, seed, source)
        key = scenario_key(scenario)
        if key in by_key:
            raise SweepError(f"{source}: resolves to the same scenario as run {by_key[key]} (a varied value that "
                             "changes nothing, e.g. control.power_cap_w under pals?); vary it in a zip group or "
                             "another sweep")
        by_key[key] = index
        params = {**assignment, **derived}
        overrides = tuple(_override_text(k, v) for k, v in [*assignment.items(), ("seed", seed), *derived.items()]
                          if k not in spec.variables())
        runs.append(Run(index, key, seed, params, overrides, scenario, scenario.control.policy, _models(scenario),
                        peak_power_w(scenario)))
    axis, linked = budget_axis(spec)
    if axis is not None and not all(_is_number(r.params[axis]) for r in runs):
        axis, linked = None, ()  # e.g. power.budget_w: [null, 1000]: no budget levels to plot against
    return Sweep(spec.name or spec_path.stem, spec, spec_path, base_path, runs, [*spec.axis_keys(), *spec.derived],
                 axis, linked)


def load_sweep(spec_path: str | Path) -> Sweep:
    """Load, validate and expand a sweep spec."""
    return expand(load_spec(spec_path), spec_path)
