"""Fit the per-GPU-type and per-engine physics parameters to a profile table (``pals calibrate``).

Only GPU and engine parameters are fitted; a model enters through its Hugging Face config alone (no
per-model factor), so a fit predicts models it never saw. The fit minimises the squared log-ratios of
predicted to measured throughput, power and (where measured) median inter-token latency, with the
closed-form steady state (``analytic_row``) as the predictor, bounded by physical ranges, from the catalog's
first estimates (scipy ``least_squares``, trust-region reflective).

Each fit also reports how well the data determines each parameter: the Gauss-Newton standard error (from the
Jacobian at the solution and the residual variance) and the pairs of parameters the data can only trade against
each other (strongly correlated estimates). A parameter with a large standard error is one the tables do not
pin down; predictions that lean on it are extrapolations.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from sim.catalog.calibration import CALIBRATION_DIR
from sim.catalog.gpus import GpuSpec, datasheet_gpu
from sim.catalog.models import load_model
from sim.errors import PalsError
from sim.io import write_json_atomic
from sim.operating_point import RowPrediction, analytic_row, row_physics, row_runs_default_moe_config
from sim.physics import EngineOverheads

PRIOR_WEIGHT = 0.02  # per parameter, in units of its range, relative to one row's log-error
# First estimates where the engine's defaults (no such cost) would leave the fit without a gradient: an eager
# step's launch time only shows once it exceeds the step's GPU work. vLLM launches a layer's ~20 kernels from
# Python in a few hundred microseconds.
FIRST_ENGINE = EngineOverheads(eager_launch_s=3e-4)
HOST_POWER_STARTS = (0.1, 0.5, 0.9)  # first trials of the host-wait power (shares of the active base power)
TILE_RESTARTS = (1.0, 48.0)  # the fused-MoE tile (tokens) tried again from the best fit, at each end of its range
RESTART_GAIN = 1e-3  # a restart must lower the cost by this share to replace the fit
CORRELATION_REPORTED = 0.8  # parameter pairs whose estimates correlate at least this strongly are reported


class CalibrationError(PalsError):
    """A fit that cannot be done (no rows, unknown GPU, ...)."""


@dataclass(frozen=True)
class Param:
    """One fitted parameter: where it lives, its physical range."""

    name: str
    part: str  # "gpu" or "engine"
    low: float
    high: float
    scale: str = ""  # "tdp": bounds are fractions of the GPU's max power limit; "idle": of its datasheet idle power

    def bounds(self, gpu: GpuSpec) -> tuple[float, float]:
        """The range of this parameter for ``gpu`` (its datasheet figures)."""
        k = {"": 1.0, "tdp": gpu.power_limit_max_w, "idle": gpu.idle_power_w}[self.scale]
        return self.low * k, self.high * k


PARAMS = (
    Param("compute_efficiency", "gpu", 0.15, 0.95),
    Param("memory_efficiency", "gpu", 0.3, 0.95),
    # Idle power is measured with nvidia-smi on an idle GPU (the datasheet figure): the fit may refine it a little
    # but not trade it against the active powers, which the operating points alone cannot separate from it.
    Param("idle_power_w", "gpu", 0.85, 1.2, "idle"),
    Param("active_base_power_w", "gpu", 0.0, 0.6, "tdp"),
    Param("compute_power_w", "gpu", 0.05, 1.2, "tdp"),
    Param("memory_power_w", "gpu", 0.0, 0.6, "tdp"),
    Param("kv_power_w", "gpu", 0.0, 0.6, "tdp"),
    Param("host_power_share", "gpu", 0.0, 1.0),
    Param("voltage_floor", "gpu", 0.35, 1.0),
    Param("voltage_knee", "gpu", 0.15, 0.9),
    Param("step_s", "engine", 0.0, 0.02),
    Param("per_seq_s", "engine", 0.0, 2e-4),
    Param("per_request_s", "engine", 0.0, 5e-3),
    Param("layer_latency_s", "engine", 0.0, 5e-4),
    Param("moe_tile_tokens", "engine", 1.0, 128.0),
    Param("expert_bandwidth_fraction", "engine", 0.1, 1.0),
    Param("expert_latency_s", "engine", 0.0, 5e-5),
    Param("expert_gemm_half_dim", "engine", 0.0, 4096.0),
    Param("expert_compute_fraction", "engine", 0.2, 1.0),
    Param("eager_launch_s", "engine", 0.0, 2e-3),
    Param("default_moe_config_slowdown", "engine", 1.0, 2.0),
)


# The voltage curve only shows in how a GPU slows under a power cap, and the host-wait power in how the cap's
# clock falls with the share of a step spent waiting on the host (at the max clock it merely trades against the
# clocked base power): without a row measured under a cap below the default limit the data cannot place them,
# and the fit holds them at the first estimates.
CAP_ONLY_PARAMS = ("voltage_floor", "voltage_knee", "host_power_share")
# Likewise the fused-MoE kernels show only in MoE models' rows: without such rows they are held at their first
# estimates too. The latency of one collective is not fitted at all: operating points cannot tell it from the
# per-layer kernel latency (a tensor-parallel layer has two), so it stays at the catalog's microbenchmark figure.
MOE_ONLY_PARAMS = ("moe_tile_tokens", "expert_bandwidth_fraction", "expert_latency_s", "expert_gemm_half_dim",
                   "expert_compute_fraction")
# The default fused-MoE config's slowdown shows only in rows of deployments that run it (no tuned file for their
# layer shape, ``sim.catalog.fused_moe``): without such rows it stays at the kernel benchmark's figure.
DEFAULT_CONFIG_PARAMS = ("default_moe_config_slowdown",)


@dataclass
class FitResult:
    """Fitted parameters of one GPU type and its engine, and how well they fit."""

    gpu: GpuSpec
    engine: EngineOverheads
    rows: int
    cost: float
    mape: dict[str, float]
    held: tuple[str, ...] = ()  # parameters held at their first estimates (the data cannot place them)
    # Standard error of each fitted parameter (NaN where it sits at a bound or was held: no error estimate).
    std: dict[str, float] = field(default_factory=dict)
    # Pairs of parameters whose estimates are strongly correlated (|r| >= CORRELATION_REPORTED), strongest first.
    correlated: list[tuple[str, str, float]] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)  # parameters held at a figure measured on the node


def has_capped_rows(rows: pd.DataFrame) -> bool:
    """Whether any row was measured under a power cap below its GPU's default limit."""
    defaults = rows["gpu"].map(lambda name: datasheet_gpu(name).default_power_limit_w)
    return bool((rows["power_cap_w"] < defaults - 1.0).any())


def any_row_runs_default_moe_config(rows: pd.DataFrame) -> bool:
    """Whether any row's deployment runs vLLM's default fused-MoE config (``sim.catalog.fused_moe``)."""
    layouts = rows.drop_duplicates(["gpu", "model", "tensor_parallel", "expert_parallel"])
    return any(row_runs_default_moe_config(r, r.gpu) for r in layouts.itertuples(index=False))


def _bounds(gpu: GpuSpec) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = zip(*(p.bounds(gpu) for p in PARAMS), strict=True)
    return np.array(lo), np.array(hi)


def _unpack(x: np.ndarray, gpu: GpuSpec) -> tuple[GpuSpec, EngineOverheads]:
    g = {p.name: float(v) for p, v in zip(PARAMS, x, strict=True) if p.part == "gpu"}
    e = {p.name: float(v) for p, v in zip(PARAMS, x, strict=True) if p.part == "engine"}
    return replace(gpu, **g), EngineOverheads(**e)


def with_params(gpu: GpuSpec, fitted: GpuSpec) -> GpuSpec:
    """``gpu``'s datasheet figures with the fitted physics parameters of ``fitted`` (a GPU of the same die)."""
    return replace(gpu, **{p.name: getattr(fitted, p.name) for p in PARAMS if p.part == "gpu"})


def _pack(gpu: GpuSpec, engine: EngineOverheads) -> np.ndarray:
    return np.array([getattr(gpu if p.part == "gpu" else engine, p.name) for p in PARAMS], dtype=float)


def predict_rows(table: pd.DataFrame, gpu: GpuSpec, engine: EngineOverheads) -> list[RowPrediction]:
    """Closed-form predictions of every row with these parameters (each row on its own GPU's datasheet)."""
    specs = {name: with_params(datasheet_gpu(name), gpu) for name in set(table["gpu"])}
    return [analytic_row(r, row_physics(r, specs[r.gpu], engine)) for r in table.itertuples(index=False)]


def _residuals(preds: list[RowPrediction], table: pd.DataFrame) -> np.ndarray:
    tput = np.array([p.throughput_tokens_per_s for p in preds])
    power = np.array([p.power_w_per_gpu for p in preds])
    itl = np.array([p.itl_median_s for p in preds])
    res = [np.log(tput / table["throughput_tokens_per_s"].to_numpy()),
           np.log(power / table["power_w_per_gpu"].to_numpy())]
    measured_itl = table["itl_median_s"].to_numpy()
    has = ~np.isnan(measured_itl)
    if has.any():
        res.append(np.log(itl[has] / measured_itl[has]))
    return np.concatenate(res)


FITTED_METRICS = ("throughput_tokens_per_s", "power_w_per_gpu", "itl_median_s")  # what the fit and its checks compare


def mape(preds: list[RowPrediction], table: pd.DataFrame) -> dict[str, float]:
    """Mean absolute percentage error per metric (ITL over the rows that measured it)."""
    out = {}
    for metric in FITTED_METRICS:
        pred = np.array([getattr(p, metric) for p in preds])
        meas = table[metric].to_numpy()
        ok = ~np.isnan(meas)
        if ok.any():
            out[metric] = float(np.mean(np.abs(pred[ok] / meas[ok] - 1.0)) * 100.0)
    return out


def fit(table: pd.DataFrame, gpu_name: str, start: tuple[GpuSpec, EngineOverheads] | None = None,
        max_evals: int = 400, same_die: tuple[str, ...] = (), measured: Mapping[str, float] | None = None,
        ) -> FitResult:
    """Fit one GPU type's parameters (and its engine's) to the table's rows of that GPU and of the GPUs
    ``same_die`` (variants of the same chip, e.g. the 40 GB and 80 GB A100: one parameter set for all).

    ``measured``: parameters measured on the node, held at those values instead of fitted (checked by
    ``check_measured``): the idle draw (nvidia-smi with no work running), the dense GEMM efficiency (a GEMM
    microbenchmark), ... Operating points alone place some of them loosely: the idle draw trades against the
    active powers, yet under a low cap it decides what is left for work; the GEMM efficiency shows only in
    compute-heavy rows.
    """
    rows = table[table["gpu"].isin([gpu_name, *same_die])].reset_index(drop=True)
    if rows.empty:
        raise CalibrationError(f"no rows for GPU {gpu_name!r} in the table (it has {sorted(set(table['gpu']))})")
    measured = {name: float(value) for name, value in (measured or {}).items()}
    for name in (gpu_name, *same_die):
        check_measured(measured, datasheet_gpu(name))
    base, engine0 = start or (datasheet_gpu(gpu_name), FIRST_ENGINE)
    base, engine0 = _with_values(base, engine0, measured)
    lo, hi = _bounds(datasheet_gpu(gpu_name))
    names = [p.name for p in PARAMS]
    for name, value in measured.items():  # a measured idle draw outside the fit's range is still kept
        i = names.index(name)
        lo[i], hi[i] = min(lo[i], value), max(hi[i], value)
    x0 = np.clip(_pack(base, engine0), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
    span = hi - lo

    z0 = (x0 - lo) / span
    prior = PRIOR_WEIGHT * math.sqrt(len(rows))
    capped = has_capped_rows(rows)
    moe = any(load_model(m).is_moe for m in set(rows["model"]))
    default_config = any_row_runs_default_moe_config(rows)
    free = np.array([(capped or p.name not in CAP_ONLY_PARAMS) and (moe or p.name not in MOE_ONLY_PARAMS)
                     and (default_config or p.name not in DEFAULT_CONFIG_PARAMS) for p in PARAMS])
    free &= np.array([p.name not in measured for p in PARAMS])
    measurements = 2 * len(rows) + int(rows["itl_median_s"].notna().sum())
    if measurements < int(free.sum()):
        raise CalibrationError(f"{len(rows)} row(s) of {gpu_name} give {measurements} measurements, fewer than the "
                               f"{int(free.sum())} parameters to fit: add operating points (other caps, batches or "
                               "models)")

    def full(z_free: np.ndarray) -> np.ndarray:
        z = z0.copy()
        z[free] = z_free
        return z

    def residuals(z_free: np.ndarray) -> np.ndarray:
        g, e = _unpack(lo + full(z_free) * span, base)
        # A weak pull towards the first estimates keeps parameters the data barely constrain (the voltage
        # curve below the lowest measured cap, say) physical instead of wherever they drift.
        return np.concatenate([_residuals(predict_rows(rows, g, e), rows), prior * (z_free - z0[free])])

    def solve(z_start: np.ndarray, name: str | None = None, value: float = 0.0) -> Any:
        """Least squares from ``z_start`` (with parameter ``name`` set to ``value`` first, when given)."""
        z = z_start.copy()
        if name is not None:
            i = names.index(name)
            z[i] = (value - lo[i]) / span[i]
        return least_squares(residuals, np.clip(z, 0.0, 1.0)[free], bounds=(0.0, 1.0), method="trf",
                             max_nfev=max_evals, diff_step=1e-4)

    # The residuals have separate minima along the host-wait power (the fit trades it against the clocked base
    # power): start it at a few levels and keep the fit with the lowest cost (on these rows alone).
    if free[names.index("host_power_share")]:
        sol = min((solve(z0, "host_power_share", share) for share in HOST_POWER_STARTS), key=lambda c: c.cost)
    else:
        sol = solve(z0)
    # The fused-MoE tile (whole tiles per touched expert) makes the residuals step-wise along it, with minima at
    # a token or two and at a few dozen: from the best fit so far, try it again at each end of that range. A
    # restart replaces the fit only when it finds a distinctly better minimum; one that merely polishes the same
    # minimum would move the loosely placed parameters along their flat directions for nothing.
    if free[names.index("moe_tile_tokens")]:
        for tokens in TILE_RESTARTS:
            candidate = solve(full(sol.x), "moe_tile_tokens", tokens)
            if candidate.cost < sol.cost * (1.0 - RESTART_GAIN):
                sol = candidate
    gpu, engine = _unpack(lo + full(sol.x) * span, base)
    gpu, engine = _with_values(gpu, engine, measured)  # exactly as measured, not as the unit range rounds them
    held = tuple(p.name for p, f in zip(PARAMS, free, strict=True) if not f and p.name not in measured)
    std, correlated = _uncertainty(sol, [p.name for p, f in zip(PARAMS, free, strict=True) if f], span[free])
    return FitResult(gpu, engine, len(rows), float(sol.cost), mape(predict_rows(rows, gpu, engine), rows), held,
                     {p.name: std.get(p.name, math.nan) for p in PARAMS}, correlated, measured)


def _with_values(gpu: GpuSpec, engine: EngineOverheads, values: Mapping[str, float],
                 ) -> tuple[GpuSpec, EngineOverheads]:
    """``gpu`` and ``engine`` with these parameters set."""
    parts = {p.name: p.part for p in PARAMS}
    return (replace(gpu, **{k: v for k, v in values.items() if parts[k] == "gpu"}),
            replace(engine, **{k: v for k, v in values.items() if parts[k] == "engine"}))


def check_measured(measured: Mapping[str, float], gpu: GpuSpec) -> None:
    """Measured parameters must be fitted ones, with physical values for ``gpu``: the idle draw a positive number of
    watts below its lowest power limit (a GPU idling above it could not be capped there), any other within the
    range the fit would search."""
    params = {p.name: p for p in PARAMS}
    for name, value in measured.items():
        if name not in params:
            raise CalibrationError(f"measured parameter {name!r}: not a fitted one (expected one of "
                                   f"{', '.join(params)})")
        if name == "idle_power_w":
            if not (math.isfinite(value) and 0.0 < value < gpu.power_limit_min_w):
                raise CalibrationError(f"idle_power_w={value:g} for {gpu.name}: expected the measured idle draw in "
                                       f"watts, above 0 and below its lowest power limit "
                                       f"({gpu.power_limit_min_w:g} W)")
            continue
        low, high = params[name].bounds(gpu)
        if not (math.isfinite(value) and low <= value <= high):
            raise CalibrationError(f"{name}={value:g} for {gpu.name}: expected {low:g} to {high:g}")


def _uncertainty(sol: Any, names: list[str], span: np.ndarray) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Gauss-Newton standard errors and strong correlations of the free parameters at a least-squares solution.

    ``cov = (JᵀJ)⁻¹ · s²`` with ``J`` the Jacobian of all residuals (data and prior) in the unit-range coordinates
    and ``s²`` the data residuals' variance (the prior adds one residual per free parameter). A parameter held at
    a bound has no such estimate (NaN), and is left out of the correlations.
    """
    n = len(names)
    n_data = len(sol.fun) - n
    data = sol.fun[:n_data]
    s2 = float(data @ data) / max(1, n_data - n)
    jac = np.asarray(sol.jac, dtype=float)
    cov = np.linalg.pinv(jac.T @ jac) * s2
    sd_unit = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    inner = np.asarray(sol.active_mask) == 0
    std = {name: float(sd_unit[i] * span[i]) if inner[i] else math.nan for i, name in enumerate(names)}
    correlated = []
    for i in range(n):
        for j in range(i + 1, n):
            if inner[i] and inner[j] and sd_unit[i] > 0 and sd_unit[j] > 0:
                r = float(cov[i, j] / (sd_unit[i] * sd_unit[j]))
                if abs(r) >= CORRELATION_REPORTED:
                    correlated.append((names[i], names[j], r))
    correlated.sort(key=lambda c: -abs(c[2]))
    return std, correlated


HOLD_OUT_COLUMNS = ("model", "power_cap_w", "max_num_seqs", "source", "gpu")


@dataclass(frozen=True)
class HeldOut:
    """One fold of a held-out check: the rows left out of the fit, and how well the fit predicts them."""

    held_out: tuple[Any, ...]  # the values of the fold's column left out (a model name, caps, ...)
    train_rows: int
    test_rows: int
    mape: dict[str, float]  # MAPE (%) per metric on the held-out rows
    rows_measured: dict[str, int] = field(default_factory=dict)  # held-out rows that measured each metric


def pooled_mape(folds: list[HeldOut]) -> dict[str, float]:
    """MAPE (%) per metric over every fold's held-out rows together, each row predicted by the fit that did not
    see it: the folds' figures weighted by the rows that measured the metric."""
    out = {}
    for metric in sorted({m for f in folds for m in f.mape}):
        # A fold that does not say how many of its rows measured the metric counts all of them.
        weights = [(f.mape[metric], f.rows_measured.get(metric, f.test_rows)) for f in folds if metric in f.mape]
        rows = sum(n for _, n in weights)
        if rows:
            out[metric] = sum(value * n for value, n in weights) / rows
    return out


def held_out_errors(table: pd.DataFrame, gpu_name: str, by: str, train_values: list[Any] | None = None,
                    same_die: tuple[str, ...] = (), measured: Mapping[str, float] | None = None) -> list[HeldOut]:
    """Fit without some rows of ``gpu_name`` (and ``same_die``) and predict them, the way the fit would meet
    data it never saw.

    Without ``train_values`` every value of column ``by`` is left out in turn (leave one model out, one cap,
    ...); with them, one fold fits on the rows whose ``by`` is among ``train_values`` and predicts the rest
    (PALS's leave-caps-out: fit on 150, 250 and 400 W, predict the other caps). ``measured``: as in ``fit``.
    """
    if by not in HOLD_OUT_COLUMNS:
        raise CalibrationError(f"--by {by!r}: expected one of {', '.join(HOLD_OUT_COLUMNS)}")
    rows = table[table["gpu"].isin([gpu_name, *same_die])].reset_index(drop=True)
    if rows.empty:
        raise CalibrationError(f"no rows for GPU {gpu_name!r} in the table (it has {sorted(set(table['gpu']))})")
    values = sorted(set(rows[by]))
    if train_values is None:
        folds = [[v] for v in values]
    else:
        missing = [v for v in train_values if v not in values]
        if missing:
            raise CalibrationError(f"--train {missing}: no rows with {by} = these (the table has {values})")
        folds = [[v for v in values if v not in train_values]]
    out = []
    for held in folds:
        test = rows[rows[by].isin(held)]
        train = rows[~rows[by].isin(held)]
        if train.empty or test.empty:
            others = [c for c in ("model", "power_cap_w", "max_num_seqs") if c != by and rows[c].nunique() > 1]
            hint = f" (the rows differ in {', '.join(others)}: try --by {others[0]})" if others else ""
            raise CalibrationError(f"holding out {by} = {held} leaves nothing to "
                                   f"{'fit' if train.empty else 'predict'}{hint}")
        result = fit(train, gpu_name, same_die=same_die, measured=measured)
        counts = {m: int(test[m].notna().sum()) for m in FITTED_METRICS}
        out.append(HeldOut(tuple(held), len(train), len(test),
                           mape(predict_rows(test, result.gpu, result.engine), test),
                           {m: n for m, n in counts.items() if n}))
    return out


def write_calibration(result: FitResult, table_path: str, table: pd.DataFrame, applies_to: list[str],
                      out_dir: str | Path = CALIBRATION_DIR) -> Path:
    """Write a fit where the catalog reads it (``<out_dir>/<gpu>.json``), with the data it came from."""
    rows = table[table["gpu"].isin([result.gpu.name, *applies_to])]
    gpu_params = {p.name: _round(getattr(result.gpu, p.name)) for p in PARAMS if p.part == "gpu"}
    engine = {p.name: _round(getattr(result.engine, p.name)) for p in PARAMS if p.part == "engine"}
    doc: dict[str, Any] = {
        "gpu": result.gpu.name,
        "applies_to": sorted({result.gpu.name, *applies_to}),
        "gpu_params": gpu_params,
        "engine": engine,
        "fitted_on": {"table": str(table_path), "rows": len(rows),
                      "sources": sorted(set(rows["source"])), "models": sorted(set(rows["model"])),
                      "power_caps_w": sorted({float(c) for c in rows["power_cap_w"]})},
        "fit": {"mape_percent": {k: round(v, 2) for k, v in result.mape.items()}, "cost": round(result.cost, 6),
                "method": "scipy.optimize.least_squares (trf) on log(predicted/measured)",
                "held_at_first_estimates": list(result.held),
                "held_as_measured": {k: _round(v) for k, v in result.measured.items()},
                # Gauss-Newton standard errors (null: at a bound or held) and strongly correlated pairs.
                "standard_error": {k: _round(v) for k, v in result.std.items()},
                "correlated_pairs": [{"a": a, "b": b, "r": round(r, 3)} for a, b, r in result.correlated]},
        "fitted_at": _dt.date.today().isoformat(),
    }
    path = Path(out_dir) / f"{result.gpu.name}.json"
    write_json_atomic(path, doc)
    return path


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v
