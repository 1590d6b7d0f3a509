"""The sweep spec (YAML, validated with pydantic v2): a base scenario, a grid, zip groups, seeds, derived fields.

```yaml
base: base.yaml                      # scenario file, relative to the spec's folder
grid:                                # cartesian product, first key outermost
  control.policy: [static, pals]     # a scenario field path (the `pals run --set` syntax) ...
  budget_fraction: [0.4, 0.7, 1.0]   # ... or a variable, used by `derived`
zip:                                 # groups of fields that vary together (equal lengths)
  - {deployments.0.model: [mixtral-8x7b, qwen3-30b-a3b], deployments.0.parallelism.tensor: [2, 1]}
seeds: [1, 2, 3]                     # innermost axis (default: the base scenario's seed)
derived:                             # fields computed from a variable (or a constant) per run
  power.budget_w: {fraction_of_peak: budget_fraction}
  control.power_cap_w: {fraction_of_gpu_max: budget_fraction}
```

Errors name the spec file, the field and what is expected (``SweepError``, a ``PalsError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sim.errors import PalsError
from sim.scenario import ScenarioError, format_validation_error, read_yaml


class SweepError(PalsError):
    """A sweep spec or sweep folder that cannot be used."""


class Derived(BaseModel):
    """A field computed per run from a variable of the grid / zip groups (its name) or a constant (a number).

    * ``fraction_of_peak`` — the value times the scenario's peak power (W): for a budget on GPU power, the sum
      over every GPU of the GPU's maximum power limit (replicas x tensor x data x ``power_limit_max_w``, all
      deployments); for ``power.budget_applies_to: system``, ``node_power_factor`` x that sum +
      ``node_overhead_w`` per node.
    * ``fraction_of_gpu_max`` — the value times the GPU's maximum power limit (W per GPU; every deployment
      must use the same GPU type), e.g. the fixed cap of ``static`` / ``batch-only`` matching a budget share.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fraction_of_peak: str | float | None = Field(None, description="Variable name or number: x peak power (W).")
    fraction_of_gpu_max: str | float | None = Field(None, description="Variable name or number: x the GPU's max "
                                                                      "power limit (W per GPU).")

    @model_validator(mode="after")
    def _one(self) -> Derived:
        given = [k for k in ("fraction_of_peak", "fraction_of_gpu_max") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of fraction_of_peak and fraction_of_gpu_max")
        return self

    @property
    def kind(self) -> str:
        """``fraction_of_peak`` or ``fraction_of_gpu_max``."""
        return "fraction_of_peak" if self.fraction_of_peak is not None else "fraction_of_gpu_max"

    @property
    def source(self) -> str | float:
        """The variable name, or the constant fraction."""
        value = self.fraction_of_peak if self.fraction_of_peak is not None else self.fraction_of_gpu_max
        assert value is not None
        return value


Seed = Annotated[int, Field(ge=0, strict=True)]


def _check_axis(values: Any, where: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: expected a non-empty list of values")
    return values


class SweepSpec(BaseModel):
    """A sweep: every combination of the grid values x zip groups x seeds, applied to the base scenario."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str | None = Field(None, description="Sweep name (default: the spec file's stem).")
    base: str = Field(min_length=1, description="Base scenario file, relative to the spec's folder.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Field path or variable -> values.")
    zip: list[dict[str, list[Any]]] = Field(default_factory=list, description="Groups of fields varying together.")
    seeds: list[Seed] | None = Field(None, description="Seeds (default: the base scenario's seed).")
    derived: dict[str, Derived] = Field(default_factory=dict, description="Field path -> derived value.")

    @field_validator("grid", mode="after")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            _check_axis(values, key)
        return v

    @field_validator("zip", mode="after")
    @classmethod
    def _zip(cls, v: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
        for i, group in enumerate(v):
            if not group:
                raise ValueError(f"group {i} is empty")
            lengths = {key: len(_check_axis(values, f"{i}.{key}")) for key, values in group.items()}
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
                raise ValueError(f"group {i}: the lists of a zip group must have equal lengths ({shown})")
        return v

    @field_validator("seeds", mode="after")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("expected a non-empty list of seeds")
            dup = sorted({s for s in v if v.count(s) > 1})
            if dup:
                raise ValueError(f"repeated seeds: {dup}")
        return v

    def check(self, source: str) -> None:
        """Cross-field checks (a key varied twice, ``seed`` in the grid, a derived field reading an unknown
        variable); raises ``SweepError`` naming ``source`` and the field."""
        seen: dict[str, str] = {}
        for where, key in [*(("grid", k) for k in self.grid),
                           *((f"zip.{i}", k) for i, g in enumerate(self.zip) for k in g)]:
            if key in seen:
                raise SweepError(f"{source}: {where}: {key} is already varied in {seen[key]}")
            if key in ("seed", "base_dir"):
                raise SweepError(f"{source}: {where}: {key} cannot be varied here"
                                 + (" (use seeds:)" if key == "seed" else ""))
            seen[key] = where
        for target, d in self.derived.items():
            if target in seen:
                raise SweepError(f"{source}: derived.{target}: also varied in {seen[target]}")
            if isinstance(d.source, str) and d.source not in seen:
                raise SweepError(f"{source}: derived.{target}: {d.kind}: {d.source!r} is not a variable of grid or "
                                 "zip")

    def axis_keys(self) -> list[str]:
        """Every varied key (grid keys, then zip keys), in the order of the file."""
        return [*self.grid, *(k for g in self.zip for k in g)]

    def variables(self) -> set[str]:
        """Keys that are variables (read by ``derived``), not scenario fields."""
        return {d.source for d in self.derived.values() if isinstance(d.source, str)}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep spec not found")
    try:
        data = read_yaml(path)
    except ScenarioError as exc:
        raise SweepError(str(exc)) from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep spec must be a YAML mapping with base, grid, zip, seeds, derived")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SweepError(format_validation_error(exc, str(path))) from None
    spec.check(str(path))
    return spec
