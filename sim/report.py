"""The HTML report of a run: power vs budget, caps and clocks, batch, throughput, latency CDFs, summary."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

SUMMARY_ROWS = (
    ("requests_completed", "requests completed", "{:,.0f}"),
    ("requests_dropped", "requests dropped", "{:,.0f}"),
    ("throughput_tokens_per_s", "output tokens/s", "{:,.1f}"),
    ("avg_power_w", "avg GPU power (W)", "{:,.0f}"),
    ("energy_j", "GPU energy (kJ)", "{:,.1f}", 1e-3),
    ("tokens_per_j", "tokens/J", "{:.3f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("tpot_p50_s", "TPOT p50 (s)", "{:.4f}"),
    ("tpot_p99_s", "TPOT p99 (s)", "{:.4f}"),
    ("itl_p50_s", "ITL p50 (s)", "{:.4f}"),
    ("itl_p99_s", "ITL p99 (s)", "{:.4f}"),
    ("e2e_p50_s", "E2E p50 (s)", "{:.2f}"),
    ("e2e_p99_s", "E2E p99 (s)", "{:.2f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("budget_violation_fraction", "budget violation (windows)", "{:.1%}"),
)


def format_metric(value: Any, fmt: str, scale: float = 1.0) -> str:
    """Format a summary value; missing values print as a dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return fmt.format(value * scale)


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: one column per deployment, plus totals when several."""
    deps = summary["deployments"]
    cols = list(deps) + (["total"] if len(deps) > 1 else [])
    data = {**deps, "total": summary["totals"]}
    rows = []
    for key, label, fmt, *scale in SUMMARY_ROWS:
        rows.append([label] + [format_metric(data[c].get(key), fmt, *(scale or [1.0])) for c in cols])
    return ["metric", *cols], rows


def table_html(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite values and their empirical cumulative fractions."""
    x = np.sort(values[np.isfinite(values)])
    return x, (np.arange(1, len(x) + 1) / len(x)) if len(x) else np.empty(0)


def power_figure(ts: pd.DataFrame) -> go.Figure:
    """Total and per-deployment GPU power against the budget."""
    fig = go.Figure()
    total = ts.groupby("time_s", sort=True).agg(power_w=("power_w", "sum"), budget_w=("budget_w", "first"))
    fig.add_scatter(x=total.index, y=total["power_w"], name="total GPU power", mode="lines")
    if ts["deployment"].nunique() > 1:
        for dep, g in ts.groupby("deployment", sort=False):
            p = g.groupby("time_s", sort=True)["power_w"].sum()
            fig.add_scatter(x=p.index, y=p.values, name=f"{dep} power", mode="lines")
    if np.isfinite(total["budget_w"]).any():
        fig.add_scatter(x=total.index, y=total["budget_w"], name="budget", mode="lines",
                        line={"dash": "dash", "color": "black"}, line_shape="hv")
    fig.update_layout(title="GPU power vs budget (window averages)", xaxis_title="time (s)", yaxis_title="W")
    return fig


def knobs_figure(ts: pd.DataFrame) -> go.Figure:
    """Power caps, SM clocks and batch over time."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("power cap per GPU (W)", "SM clock per GPU (MHz)",
                                        "running batch per replica (and max_num_seqs)"))
    for gpu, g in ts.groupby("gpu", sort=True):
        fig.add_scatter(x=g["time_s"], y=g["power_cap_w"], name=f"cap gpu{gpu}", mode="lines", line_shape="hv",
                        row=1, col=1, legendgroup="cap")
        fig.add_scatter(x=g["time_s"], y=g["clock_mhz"], name=f"clock gpu{gpu}", mode="lines", row=2, col=1,
                        legendgroup="clock")
    first = ts.drop_duplicates(["time_s", "deployment", "replica"])
    for (dep, rep), g in first.groupby(["deployment", "replica"], sort=False):
        fig.add_scatter(x=g["time_s"], y=g["batch"], name=f"{dep}/r{rep} batch", mode="lines", row=3, col=1,
                        legendgroup="batch")
    for dep, g in first.groupby("deployment", sort=False):
        knob = g.drop_duplicates("time_s")
        fig.add_scatter(x=knob["time_s"], y=knob["max_num_seqs"], name=f"{dep} max_num_seqs", mode="lines",
                        line={"dash": "dot"}, line_shape="hv", row=3, col=1, legendgroup="batch")
    fig.update_layout(height=800, title="Knobs and response")
    fig.update_xaxes(title_text="time (s)", row=3, col=1)
    return fig


def throughput_figure(ts: pd.DataFrame) -> go.Figure:
    """Output tokens/s per deployment over time."""
    fig = go.Figure()
    first = ts.drop_duplicates(["time_s", "deployment", "replica"])
    for dep, g in first.groupby("deployment", sort=False):
        t = g.groupby("time_s", sort=True)["throughput_tokens_per_s"].sum()
        fig.add_scatter(x=t.index, y=t.values, name=dep, mode="lines")
    fig.update_layout(title="Output throughput", xaxis_title="time (s)", yaxis_title="tokens/s")
    return fig


def latency_figure(requests: pd.DataFrame) -> go.Figure:
    """CDFs of TTFT, TPOT and end-to-end latency of completed requests."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("TTFT (s)", "TPOT (s)", "end-to-end (s)"))
    done = requests[requests["status"] == "completed"]
    for dep, g in done.groupby("deployment", sort=False):
        multi = g[g["generated_tokens"] > 1]
        series = ((g["first_token_s"] - g["arrival_s"]).to_numpy(),
                  ((multi["finish_s"] - multi["first_token_s"]) / (multi["generated_tokens"] - 1)).to_numpy(),
                  (g["finish_s"] - g["arrival_s"]).to_numpy())
        for i, values in enumerate(series):
            x, y = cdf(values)
            fig.add_scatter(x=x, y=y, name=f"{dep}", mode="lines", row=1, col=i + 1, legendgroup=dep,
                            showlegend=i == 0)
    fig.update_yaxes(title_text="fraction of requests", row=1, col=1)
    fig.update_layout(title="Latency CDFs (completed requests)", height=420)
    return fig


def render_report(title: str, sections: list[tuple[str, str]], figures: list[go.Figure],
                  appendix: list[tuple[str, str]] = ()) -> str:
    """A self-contained HTML page: text sections, figures (plotly.js inlined once), then appendix sections."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    for heading, body in appendix:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def run_report(summary: dict[str, Any], requests: pd.DataFrame, timeseries: pd.DataFrame,
               scenario_yaml: str) -> str:
    """The report page of one run."""
    header, rows = summary_rows(summary)
    t = summary["totals"]
    facts = (f"<p>policy <b>{html.escape(str(summary['policy']))}</b>, seed {summary['seed']}, "
             f"{t['duration_s']:.1f} s simulated on {t['num_gpus']} GPUs in {t['wall_s']:.2f} s wall "
             f"({t['sim_events']:,} simulation events)</p>")
    figures = [power_figure(timeseries), throughput_figure(timeseries), knobs_figure(timeseries),
               latency_figure(requests)]
    return render_report(f"pals run: {summary['scenario']}", [("Summary", facts + table_html(header, rows))],
                         figures, [("Scenario (resolved)", f"<pre>{html.escape(scenario_yaml)}</pre>")])
