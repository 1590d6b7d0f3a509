"""``DIR/report.html`` of a sweep: self-contained plotly (the library inlined, readable offline).

Pareto fronts of tokens/J vs throughput and vs QoS violations, heatmaps of throughput retained (budget x
policy, one per model mix), throughput retained vs budget (one line per model mix, one panel per policy), and
tables of the numbers and of the failed runs.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from sim.report import render_report, table_html
from sim.sweep.analysis import MODELS, POLICY, REFERENCE_POLICY, budget_table, pareto_mask, throughput_retained
from sim.sweep.expand import Sweep


def _colors(values: list[str]) -> dict[str, str]:
    palette = qualitative.Plotly
    return {v: palette[i % len(palette)] for i, v in enumerate(values)}


def _hover(sweep: Sweep, df: pd.DataFrame) -> list[str]:
    cols = [*sweep.param_columns, "seed"]
    return ["<br>".join(f"{c}={row[c]}" for c in cols) + f"<br>run {row['run_index']}" for _, row in df.iterrows()]


def pareto_figure(sweep: Sweep, ok: pd.DataFrame, y: str, y_title: str, maximize_y: bool, title: str) -> go.Figure:
    """Every run as a point (coloured by policy), tokens/J on x, and the Pareto front as a line."""
    fig = go.Figure()
    colors = _colors(list(dict.fromkeys(ok[POLICY])))
    for policy, g in ok.groupby(POLICY, sort=False):
        fig.add_scatter(x=g["tokens_per_j"], y=g[y], mode="markers", name=str(policy), text=_hover(sweep, g),
                        marker={"color": colors[policy], "size": 8, "opacity": 0.8},
                        hovertemplate="%{text}<br>tokens/J %{x:.3f}<br>" + y_title + " %{y:.4g}<extra></extra>")
    x, yy = ok["tokens_per_j"].to_numpy(float), ok[y].to_numpy(float)
    front = ok[pareto_mask(x, yy, maximize_y)].sort_values("tokens_per_j")
    fig.add_scatter(x=front["tokens_per_j"], y=front[y], mode="lines", name="Pareto front",
                    line={"color": "black", "dash": "dash", "shape": "hv" if maximize_y else "linear"})
    fig.update_layout(title=title, xaxis_title="tokens/J (output tokens per GPU joule)", yaxis_title=y_title)
    return fig


def _budget_label(sweep: Sweep) -> str:
    axis = sweep.budget_axis or ""
    return f"{axis} (fraction of peak)" if axis != "power.budget_w" else "power.budget_w (W)"


def heatmap_figure(sweep: Sweep, table: pd.DataFrame) -> go.Figure:
    """Throughput retained (mean over seeds) by budget level and policy, one panel per model mix."""
    axis = sweep.budget_axis
    models = list(dict.fromkeys(table[MODELS]))
    fig = make_subplots(rows=len(models), cols=1, subplot_titles=models, vertical_spacing=0.12 / max(len(models), 1))
    for i, m in enumerate(models):
        t = table[table[MODELS] == m].pivot_table(index=POLICY, columns=axis, values="throughput_retained",
                                                   sort=False)
        z = t.to_numpy(float)
        text = [[("-" if not np.isfinite(v) else f"{v:.1%}") for v in row] for row in z]
        fig.add_heatmap(z=z, x=[f"{c:g}" for c in t.columns], y=[str(p) for p in t.index], text=text,
                        texttemplate="%{text}", colorscale="Viridis", zmin=float(np.nanmin(z)) if z.size else 0,
                        zmax=max(1.0, float(np.nanmax(z))) if z.size else 1, colorbar={"title": "retained"},
                        row=i + 1, col=1, showscale=i == 0)
        fig.update_xaxes(title_text=_budget_label(sweep), type="category", row=i + 1, col=1)
    fig.update_layout(title="Throughput retained vs the reference run (see above), mean over seeds",
                      height=max(380, 320 * len(models)))
    return fig


def lines_figure(sweep: Sweep, table: pd.DataFrame, metric: str, y_title: str) -> go.Figure:
    """``metric`` (mean over seeds) vs budget level: one panel per policy, one line per model mix."""
    axis = sweep.budget_axis
    policies = list(dict.fromkeys(table[POLICY]))
    colors = _colors(list(dict.fromkeys(table[MODELS])))
    fig = make_subplots(rows=1, cols=len(policies), subplot_titles=policies, shared_yaxes=True)
    for j, p in enumerate(policies):
        for m, g in table[table[POLICY] == p].groupby(MODELS, sort=False):
            g = g.sort_values(axis)
            fig.add_scatter(x=g[axis], y=g[metric], mode="lines+markers", name=str(m), legendgroup=str(m),
                            showlegend=j == 0, line={"color": colors[m]}, row=1, col=j + 1)
        fig.update_xaxes(title_text=axis, row=1, col=j + 1)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=f"{y_title} vs budget level (mean over seeds), one line per model", height=420)
    return fig


def _fmt(v: object, col: str) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if col in ("throughput_retained", "slo_attainment", "budget_violation_fraction"):
            return f"{v:.1%}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def table_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The budget table as text cells."""
    header = [str(c) for c in table.columns]
    return header, [[_fmt(v, c) for c, v in zip(table.columns, row, strict=True)] for row in table.itertuples(False)]


def _retained_note(sweep: Sweep, ok: pd.DataFrame) -> str:
    """What "throughput retained" means for this sweep (nothing without a budget axis)."""
    axis = sweep.budget_axis
    if axis is None or ok.empty:
        return ""
    reference = ("the static policy (one unconstrained yardstick for every policy)"
                 if REFERENCE_POLICY in set(ok[POLICY]) else "the run's own policy (this sweep has no static runs)")
    return (f"<p><b>Throughput retained</b>: a run's output throughput divided by that of its reference run, the run "
            f"with the same seed and the same values of the other varied keys at this sweep's highest "
            f"<code>{html.escape(axis)}</code> ({ok[axis].max():g}) under {reference}.</p>")


def sweep_report(sweep: Sweep, df: pd.DataFrame) -> str:
    """The whole report page."""
    ok = df[df["status"] == "ok"].assign(throughput_retained=throughput_retained(sweep, df))
    failed = df[df["status"] != "ok"]
    facts = (f"<p>spec <code>{html.escape(str(sweep.spec_path))}</code>, base scenario "
             f"<code>{html.escape(str(sweep.base_path))}</code>: {len(sweep.runs)} runs, {len(df)} recorded "
             f"({len(ok)} ok, {len(failed)} failed), varied: {html.escape(', '.join(sweep.param_columns))}, seeds "
             f"{html.escape(str(sorted(set(r.seed for r in sweep.runs))))}. Peak power: the sum over every GPU of its "
             f"maximum power limit (for a budget on system power, the node power at that GPU power).</p>"
             + _retained_note(sweep, ok))
    figures: list[go.Figure] = []
    sections = [("Sweep", facts)]
    if not ok.empty:
        figures.append(pareto_figure(sweep, ok, "throughput_tokens_per_s", "output tokens/s", True,
                                     "Pareto front: tokens/J vs throughput (every run)"))
        if ok["qos_violation_fraction"].notna().any():
            figures.append(pareto_figure(sweep, ok, "qos_violation_fraction", "QoS violation fraction", False,
                                         "Pareto front: tokens/J vs QoS violations (windows below the target)"))
        else:
            ok = ok.assign(slo_violation_fraction=1.0 - ok["slo_attainment"])
            figures.append(pareto_figure(sweep, ok, "slo_violation_fraction", "SLO violation fraction", False,
                                         "Pareto front: tokens/J vs SLO violations (the scenario has no throughput "
                                         "target, so no QoS windows: requests missing their SLO instead)"))
        table = budget_table(sweep, df)
        if sweep.budget_axis is not None:
            figures.append(heatmap_figure(sweep, table))
            figures.append(lines_figure(sweep, table, "throughput_retained", "throughput retained"))
            figures.append(lines_figure(sweep, table, "tokens_per_j", "tokens/J"))
        header, rows = table_rows(table)
        sections.append(("Numbers (mean over seeds)", table_html(header, rows)))
    if not failed.empty:
        rows = [[str(r.run_index), str(r.overrides), str(r.error)]
                for r in failed.itertuples()]
        sections.append(("Failed runs", table_html(["run", "overrides", "error"], rows)))
    return render_report(f"pals sweep: {sweep.name}", sections, figures)
