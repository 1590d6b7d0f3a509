"""The HTML report of a hardware run: the figures of ``pals run``'s report, with what was measured where."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from sim.report import (
    knobs_figure,
    latency_figure,
    power_figure,
    render_report,
    summary_rows,
    table_html,
    throughput_figure,
)


def hil_report(summary: dict[str, Any], requests: pd.DataFrame, timeseries: pd.DataFrame, scenario_yaml: str) -> str:
    """The report page of one hardware run."""
    header, rows = summary_rows(summary)
    t, h = summary["totals"], summary.get("hil", {})
    state = "complete" if h.get("complete") else f"interrupted ({h.get('interrupted_by') or 'partial snapshot'})"
    facts = (f"<p>policy <b>{html.escape(str(summary['policy']))}</b>, seed {summary['seed']}: "
             f"{t['duration_s']:.1f} s of scenario time measured on {t['num_gpus']} GPU(s) "
             f"({html.escape(', '.join(h.get('gpu_names', [])))}, indices {h.get('gpus')}) through "
             f"{html.escape(str(h.get('endpoint')))} (model {html.escape(str(h.get('server_model')))}), "
             f"speed-up {h.get('speedup', 1.0):g}, {h.get('wall_s', 0.0):.1f} s wall; run {html.escape(state)}</p>")
    errors = h.get("actuation_errors") or []
    if errors:
        facts += "<p>power limits refused: " + html.escape("; ".join(errors)) + "</p>"
    figures = []
    if len(timeseries):
        figures += [power_figure(timeseries), throughput_figure(timeseries), knobs_figure(timeseries)]
    if len(requests):
        figures.append(latency_figure(requests))
    return render_report(f"pals hil run: {summary['scenario']}", [("Summary", facts + table_html(header, rows))],
                         figures, [("Scenario (resolved)", f"<pre>{html.escape(scenario_yaml)}</pre>")])
