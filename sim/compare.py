"""Run one scenario under several policies and put their results side by side.

``pals compare S --policies static,pals --out DIR`` writes each run's files into ``DIR/<policy>/`` and a
comparison into ``DIR/compare.json`` and ``DIR/report.html``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import plotly.colors as px_colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sim.control.base import resolve_policy
from sim.io import write_json_atomic, write_text_atomic
from sim.report import SUMMARY_ROWS, cdf, format_metric, render_report, table_html
from sim.run import RunOutputs, run_scenario, write_outputs
from sim.scenario import Scenario, ScenarioError, scenario_from_dict

COMPARE_ROWS = (*SUMMARY_ROWS,
                ("system_tokens_per_j", "system tokens/J (node power)", "{:.3f}"),
                ("power_tracking_error_w", "power tracking error (W)", "{:,.0f}"),
                ("qos_violation_fraction", "QoS violation (windows)", "{:.1%}"))


def with_policy(scenario: Scenario, policy: str) -> Scenario:
    """The scenario with another control policy (validated again)."""
    data = scenario.model_dump(mode="json", exclude={"base_dir"})
    data["control"]["policy"] = policy
    return scenario_from_dict(data, f"{scenario.name} (policy {policy})", scenario.base_dir)


def compare_rows(summaries: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per policy, scenario totals."""
    policies = list(summaries)
    rows = []
    for key, label, fmt, *scale in COMPARE_ROWS:
        rows.append([label] + [format_metric(summaries[p]["totals"].get(key), fmt, *(scale or [1.0]))
                               for p in policies])
    return ["metric", *policies], rows


def run_compare(scenario: Scenario, policies: list[str], out_dir: str | Path) -> dict[str, RunOutputs]:
    """Run every policy, write each run's outputs and the comparison; return the outputs by policy."""
    if not policies or len(set(policies)) != len(policies):
        raise ScenarioError(f"--policies: expected distinct policy names, got {','.join(policies) or 'none'}")
    for policy in policies:  # fail before any run, not after the first ones
        resolve_policy(policy)
    out = Path(out_dir)
    results: dict[str, RunOutputs] = {}
    for policy in policies:
        sc = with_policy(scenario, policy)
        results[policy] = run_scenario(sc)
        write_outputs(out / policy, sc, results[policy], report=False)
    summaries = {p: r.summary for p, r in results.items()}
    write_json_atomic(out / "compare.json", {"scenario": scenario.name, "policies": summaries})
    write_text_atomic(out / "report.html", compare_report(scenario, results))
    return results


def compare_report(scenario: Scenario, results: dict[str, RunOutputs]) -> str:
    """One page: totals side by side, then power, throughput, knobs and latency per policy."""
    header, rows = compare_rows({p: r.summary for p, r in results.items()})
    power = go.Figure()
    tput = go.Figure()
    knobs = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                          subplot_titles=("mean power cap per GPU (W)", "batch knob (max_num_seqs)"))
    lat = make_subplots(rows=1, cols=2, subplot_titles=("TTFT (s)", "TPOT (s)"))
    budget_drawn = False
    palette = px_colors.qualitative.Plotly
    for i, (policy, r) in enumerate(results.items()):
        color = palette[i % len(palette)]
        ts = r.timeseries
        per_t = ts.groupby("time_s", sort=True).agg(power=("power_w", "sum"), budget=("budget_w", "first"),
                                                   cap=("power_cap_w", "mean"), knob=("max_num_seqs", "mean"))
        power.add_scatter(x=per_t.index, y=per_t["power"], name=policy, mode="lines", line={"color": color})
        if not budget_drawn and np.isfinite(per_t["budget"]).any():
            power.add_scatter(x=per_t.index, y=per_t["budget"], name="budget", mode="lines", line_shape="hv",
                              line={"dash": "dash", "color": "black"})
            budget_drawn = True
        t = ts.drop_duplicates(["time_s", "deployment", "replica"]).groupby("time_s", sort=True)[
            "throughput_tokens_per_s"].sum()
        tput.add_scatter(x=t.index, y=t.values, name=policy, mode="lines", line={"color": color})
        knobs.add_scatter(x=per_t.index, y=per_t["cap"], name=f"{policy} cap", mode="lines", line_shape="hv",
                          line={"color": color}, row=1, col=1)
        knobs.add_scatter(x=per_t.index, y=per_t["knob"], name=f"{policy} batch knob", mode="lines",
                          line_shape="hv", line={"color": color, "dash": "dot"}, row=2, col=1)
        done = r.requests[r.requests["status"] == "completed"]
        multi = done[done["generated_tokens"] > 1]
        for col, values in ((1, (done["first_token_s"] - done["arrival_s"]).to_numpy()),
                            (2, ((multi["finish_s"] - multi["first_token_s"])
                                 / (multi["generated_tokens"] - 1)).to_numpy())):
            x, y = cdf(values)
            lat.add_scatter(x=x, y=y, name=policy, mode="lines", row=1, col=col, legendgroup=policy,
                            showlegend=col == 1, line={"color": color})
    power.update_layout(title="Total GPU power vs budget", xaxis_title="time (s)", yaxis_title="W")
    tput.update_layout(title="Output throughput", xaxis_title="time (s)", yaxis_title="tokens/s")
    knobs.update_layout(title="Knobs", height=600)
    knobs.update_xaxes(title_text="time (s)", row=2, col=1)
    lat.update_layout(title="Latency CDFs (completed requests)", height=420)
    names = ", ".join(html.escape(p) for p in results)
    intro = f"<p>Scenario <b>{html.escape(scenario.name)}</b>, seed {scenario.seed}, policies {names}.</p>"
    return render_report(f"pals compare: {scenario.name}", [("Totals", intro + table_html(header, rows))],
                         [power, tput, knobs, lat])
