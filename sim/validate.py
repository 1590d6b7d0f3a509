"""``pals validate``: simulate every row of a profile table and compare with what was measured.

Writes ``validation.csv`` (measured and predicted per row), ``validation.json`` (MAPE per metric, overall,
per source, per model, per GPU and per model on each GPU) and ``validation.html`` (predicted vs measured,
error by cap and batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sim.errors import PalsError
from sim.io import write_json_atomic, write_text_atomic
from sim.operating_point import analytic_row, row_physics, simulate_row
from sim.profile import check_catalog

METRICS = ("throughput_tokens_per_s", "power_w_per_gpu", "itl_median_s", "itl_p99_s", "running_seqs_mean",
           "gpu_busy_fraction")
METRIC_LABELS = {"throughput_tokens_per_s": "tok/s", "power_w_per_gpu": "power", "itl_median_s": "ITL p50",
                 "itl_p99_s": "ITL p99", "running_seqs_mean": "batch", "gpu_busy_fraction": "busy"}


def predict_table(table: pd.DataFrame, where: str, method: str = "simulate") -> pd.DataFrame:
    """Every row with ``predicted_<metric>`` and ``error_<metric>_pct`` columns added.

    ``method``: ``simulate`` (run the simulator per row) or ``analytic`` (closed-form steady state).
    """
    check_catalog(table, where)
    preds = []
    for i, row in enumerate(table.itertuples(index=False)):
        try:
            p = simulate_row(row) if method == "simulate" else analytic_row(row, row_physics(row))
        except (ValueError, PalsError) as exc:  # e.g. the weights do not fit, or a layout the model refuses
            raise PalsError(f"{where}, line {i + 2}: {row.model} on {row.num_gpus}x{row.gpu} (tensor_parallel "
                            f"{row.tensor_parallel}): {exc}") from None
        preds.append(p)
    out = table.copy()
    for m in METRICS:
        out[f"predicted_{m}"] = [getattr(p, m) for p in preds]
        out[f"error_{m}_pct"] = (out[f"predicted_{m}"] / out[m] - 1.0) * 100.0
    return out


def mape_summary(validated: pd.DataFrame) -> dict[str, Any]:
    """MAPE (%) per metric: overall and per source, model, GPU and model on GPU (the ITL, the running batch and
    the GPU busy share over the rows that measured them)."""

    def block(df: pd.DataFrame) -> dict[str, Any]:
        res: dict[str, Any] = {"rows": len(df), "rows_measured": {}}  # rows with each metric measured
        for m in METRICS:
            err = df[f"error_{m}_pct"].abs().dropna()
            if len(err):
                res[m] = round(float(err.mean()), 2)
                res["rows_measured"][m] = len(err)
        return res

    summary: dict[str, Any] = {"overall": block(validated)}
    for key in ("source", "model", "gpu"):
        summary[f"by_{key}"] = {str(k): block(g) for k, g in validated.groupby(key, sort=True)}
    pairs = validated.groupby(["model", "gpu"], sort=True)
    summary["by_model_gpu"] = {f"{model} on {gpu}": block(g) for (model, gpu), g in pairs}
    return summary


def summary_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the MAPE (%) table, one column per metric the table measured: overall, then each GPU
    and each model on each GPU where the table covers several GPUs (a model's figures on two GPUs are not one
    figure), else each model."""
    metrics = [m for m in METRICS if m in summary["overall"]]  # those the table measured
    header = ["", "rows", *[METRIC_LABELS[m] for m in metrics]]
    blocks = [("overall", summary["overall"])]
    if len(summary["by_gpu"]) > 1:
        blocks += [*summary["by_gpu"].items(), *summary["by_model_gpu"].items()]
    else:
        blocks += list(summary["by_model"].items())
    rows = [[name, str(b["rows"]), *[f"{b[m]:.1f}" if m in b else "-" for m in metrics]] for name, b in blocks]
    return header, rows


# The unit of each metric on the predicted-vs-measured axes.
AXIS_UNITS = {"throughput_tokens_per_s": "(output tokens/s)", "power_w_per_gpu": "(W per GPU)",
              "itl_median_s": "(s)", "itl_p99_s": "(s)", "running_seqs_mean": "(sequences)",
              "gpu_busy_fraction": "(share of time a kernel ran)"}


def validation_page(validated: pd.DataFrame, summary: dict[str, Any], title: str) -> str:
    """The HTML page: predicted vs measured per metric, and the error by power cap and by batch."""
    present = [m for m in METRICS if validated[m].notna().any()]
    fig = make_subplots(rows=2, cols=len(present), subplot_titles=[
        *[f"{m}: predicted vs measured" for m in present], *[f"{m}: error (%) by cap" for m in present]])
    colours = {}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    for model in sorted(set(validated["model"])):
        colours[model] = palette[len(colours) % len(palette)]
    for col, m in enumerate(present, start=1):
        rows = validated[validated[m].notna()]
        lo, hi = float(rows[[m, f"predicted_{m}"]].min().min()), float(rows[[m, f"predicted_{m}"]].max().max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "grey"},
                                 showlegend=False), row=1, col=col)
        for model, g in rows.groupby("model", sort=True):
            text = [f"{r.gpu} x{r.num_gpus}, cap {r.power_cap_w:g} W, batch {r.max_num_seqs}" for r in g.itertuples()]
            fig.add_trace(go.Scatter(x=g[m], y=g[f"predicted_{m}"], mode="markers", name=model, text=text,
                                     legendgroup=model, showlegend=col == 1,
                                     marker={"color": colours[model], "size": 6}), row=1, col=col)
            fig.add_trace(go.Scatter(x=g["power_cap_w"], y=g[f"error_{m}_pct"], mode="markers", name=model,
                                     text=[f"batch {b}" for b in g["max_num_seqs"]], legendgroup=model,
                                     showlegend=False, marker={"color": colours[model], "size": 6}), row=2, col=col)
        unit = AXIS_UNITS.get(m, "")
        fig.update_xaxes(type="log", title_text=f"measured {unit}", row=1, col=col)
        fig.update_yaxes(type="log", title_text=f"predicted {unit}", row=1, col=col)
        fig.update_xaxes(title_text="power cap (W)", row=2, col=col)
        fig.update_yaxes(title_text="error (%)", row=2, col=col)
    fig.update_layout(height=800, title=title)
    batch_fig = go.Figure()
    for model, g in validated.groupby("model", sort=True):
        batch_fig.add_trace(go.Scatter(x=g["max_num_seqs"], y=g["error_throughput_tokens_per_s_pct"], mode="markers",
                                       name=model, marker={"color": colours[model]}))
    batch_fig.update_layout(title="throughput error (%) by batch (max_num_seqs)", xaxis_type="log", height=400,
                            xaxis_title="max_num_seqs (batch knob)", yaxis_title="throughput error (%)")
    header, rows = summary_table(summary)
    head = "".join(f"<th>{h}</th>" for h in header)
    table_rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<html><head><meta charset='utf-8'><title>{title}</title></head><body><h1>{title}</h1>"
            f"<p>Mean absolute percentage error, predicted vs measured:</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{table_rows}</table>"
            + fig.to_html(full_html=False, include_plotlyjs="inline")  # readable offline
            + batch_fig.to_html(full_html=False, include_plotlyjs=False) + "</body></html>")


def write_validation(validated: pd.DataFrame, out_dir: str | Path, title: str,
                     method: str = "simulate") -> dict[str, Any]:
    """Write validation.csv, validation.json and validation.html; return the MAPE summary (``method``: how the
    predictions were made, ``simulate`` or ``analytic``, recorded in the JSON)."""
    out = Path(out_dir)
    summary = {"method": method, **mape_summary(validated)}
    write_text_atomic(out / "validation.csv", validated.to_csv(index=False, float_format="%.6g"))
    write_json_atomic(out / "validation.json", summary)
    write_text_atomic(out / "validation.html", validation_page(validated, summary, title))
    return summary
