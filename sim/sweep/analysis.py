"""Derived views of a sweep's results: throughput retained against a reference run, Pareto fronts, tables.

**Throughput retained** of a run = its output throughput ÷ the throughput of its reference run: the run with the
same seed and the same values of every other varied parameter (model mix, ...), at the sweep's highest budget
level (100 % of peak in ``scenarios/whatif/grid_budget.yaml``, where no cap binds), under the ``static``
policy when the sweep has ``static`` runs — one common, unconstrained yardstick for every policy — and under
the run's own policy otherwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.sweep.expand import Sweep

POLICY = "policy"
MODELS = "models"
REFERENCE_POLICY = "static"


def group_columns(sweep: Sweep) -> list[str]:
    """Columns that identify "the same run, other than budget and policy": other varied keys, and the seed."""
    skip = {*sweep.budget_columns, "control.policy"}
    return [c for c in sweep.param_columns if c not in skip] + ["seed"]


def throughput_retained(sweep: Sweep, df: pd.DataFrame) -> pd.Series:
    """Throughput retained of every row (NaN without a budget axis, for failed rows, or with no reference)."""
    out = pd.Series(np.nan, index=df.index, name="throughput_retained")
    axis = sweep.budget_axis
    ok = df[df["status"] == "ok"]
    if axis is None or ok.empty:
        return out
    top = ok[axis].max()
    same_policy = REFERENCE_POLICY not in set(ok[POLICY])
    keys = group_columns(sweep) + ([POLICY] if same_policy else [])
    ref = ok[ok[axis] == top]
    if not same_policy:
        ref = ref[ref[POLICY] == REFERENCE_POLICY]
    ref = ref[[*keys, "throughput_tokens_per_s"]].rename(columns={"throughput_tokens_per_s": "_ref"})
    ref = ref.drop_duplicates(keys)
    merged = ok[[*keys, "throughput_tokens_per_s"]].reset_index().merge(ref, on=keys, how="left").set_index("index")
    out.loc[merged.index] = merged["throughput_tokens_per_s"] / merged["_ref"]
    return out


def pareto_mask(x: np.ndarray, y: np.ndarray, maximize_y: bool = True) -> np.ndarray:
    """Points not dominated when maximizing ``x`` and maximizing (or minimizing) ``y``."""
    yy = y if maximize_y else -y
    order = np.lexsort((-yy, -x))  # x descending, then y best first
    mask = np.zeros(len(x), dtype=bool)
    best = -np.inf
    for i in order:
        if np.isfinite(x[i]) and np.isfinite(yy[i]) and yy[i] > best:
            mask[i] = True
            best = yy[i]
    return mask


TABLE_METRICS = (
    ("throughput_tokens_per_s", "tokens/s"), ("throughput_retained", "retained"), ("tokens_per_j", "tokens/J"),
    ("avg_power_w", "avg GPU W"), ("ttft_p99_s", "TTFT p99 s"), ("tpot_p99_s", "TPOT p99 s"),
    ("slo_attainment", "SLO"), ("budget_violation_fraction", "budget viol."),
)


def budget_table(sweep: Sweep, df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds (and any other varied parameter) of the main metrics, per model mix, policy and budget
    level; with the spread over seeds of throughput (max − min) as ``throughput_spread``."""
    ok = df[df["status"] == "ok"].assign(throughput_retained=throughput_retained(sweep, df))
    by = [MODELS, POLICY] + ([sweep.budget_axis] if sweep.budget_axis else [])
    metrics = [m for m, _ in TABLE_METRICS]
    g = ok.groupby(by, sort=False)
    table = g[metrics].mean()
    table["throughput_spread"] = g["throughput_tokens_per_s"].max() - g["throughput_tokens_per_s"].min()
    table["runs"] = g.size()
    return table.reset_index()
