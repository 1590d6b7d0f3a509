"""``pals hil validate DIR``: the simulator's prediction of a recorded hardware run, metric by metric.

The run's resolved scenario (``DIR/scenario.resolved.yaml``, relative paths resolved from the original
scenario's folder) is simulated for the duration the run actually covered, and each summary metric is
compared: error = (simulated − measured) / measured. The simulated run's own files go to ``DIR/simulated/``
so the two can also be compared line by line (same columns).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from sim.errors import PalsError
from sim.io import write_json_atomic, write_text_atomic
from sim.report import power_figure, render_report, table_html, throughput_figure
from sim.scenario import scenario_from_dict

# (summary key, label, format)
METRICS = (
    ("throughput_tokens_per_s", "output tokens/s", "{:,.1f}"),
    ("avg_power_w", "avg GPU power (W)", "{:,.1f}"),
    ("energy_j", "GPU energy (J)", "{:,.0f}"),
    ("tokens_per_j", "tokens/J", "{:.4f}"),
    ("gpu_utilization", "GPU utilization", "{:.3f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.4f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.4f}"),
    ("tpot_p50_s", "TPOT p50 (s)", "{:.5f}"),
    ("tpot_p99_s", "TPOT p99 (s)", "{:.5f}"),
    ("itl_p50_s", "ITL p50 (s)", "{:.5f}"),
    ("itl_p99_s", "ITL p99 (s)", "{:.5f}"),
)


class HilValidationError(PalsError):
    """A folder that is not a readable hardware run."""


def relative_error(simulated: float | None, measured: float | None) -> float:
    """(simulated − measured) / measured; nan when either is missing or the measurement is 0."""
    if simulated is None or measured is None:
        return math.nan
    s, m = float(simulated), float(measured)
    if not (math.isfinite(s) and math.isfinite(m)) or m == 0:
        return math.nan
    return (s - m) / m


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def load_run(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """A recorded run's summary and its scenario (for the duration it covered)."""
    if not run_dir.is_dir():
        raise HilValidationError(f"{run_dir}: no such folder (expected the --out folder of `pals hil run`)")
    summary_path, scenario_path = run_dir / "summary.json", run_dir / "scenario.resolved.yaml"
    for p in (summary_path, scenario_path):
        if not p.is_file():
            raise HilValidationError(f"{run_dir}: {p.name} is missing: not the output folder of `pals hil run`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        data = yaml.safe_load(scenario_path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HilValidationError(f"{run_dir}: unreadable run files ({exc})") from None
    hil = summary.get("hil") if isinstance(summary, dict) else None
    if not isinstance(hil, dict) or "totals" not in summary:
        raise HilValidationError(f"{summary_path}: not the summary of a `pals hil run` (no 'hil' section)")
    duration = summary["totals"].get("duration_s") or 0.0
    if not duration > 0:
        raise HilValidationError(f"{run_dir}: the run recorded no control window (duration 0 s): nothing to compare")
    if not isinstance(data, dict):
        raise HilValidationError(f"{scenario_path}: not a scenario mapping")
    data["duration_s"] = float(duration)
    base = hil.get("scenario_dir") or str(run_dir)
    scenario = scenario_from_dict(data, str(scenario_path), base if Path(base).is_dir() else run_dir)
    return summary, scenario


def validate_run(run_dir: str | Path) -> dict[str, Any]:
    """Simulate a recorded run's scenario and compare; write ``hil_validation.json`` and ``.html`` and the
    simulated run's files (``simulated/``) into the run's folder. Returns the validation record (with ``table``:
    terminal rows)."""
    from sim.run import run_scenario, write_outputs

    run_dir = Path(run_dir)
    measured_summary, scenario = load_run(run_dir)
    simulated = run_scenario(scenario)
    write_outputs(run_dir / "simulated", scenario, simulated, report=False)
    measured, predicted = measured_summary["totals"], simulated.summary["totals"]
    metrics: dict[str, Any] = {}
    rows = []
    for key, label, fmt in METRICS:
        m, s = measured.get(key), predicted.get(key)
        err = relative_error(s, m)
        metrics[key] = {"measured": m, "simulated": s, "error": err}
        rows.append([label, _fmt(m, fmt), _fmt(s, fmt), _fmt(100.0 * err, "{:+.1f}")])
    finite = [abs(v["error"]) for v in metrics.values() if math.isfinite(v["error"])]
    hil = measured_summary.get("hil", {})
    record = {
        "scenario": scenario.name, "policy": scenario.control.policy, "seed": scenario.seed,
        "duration_s": scenario.duration_s, "speedup": hil.get("speedup"), "endpoint": hil.get("endpoint"),
        "run_complete": hil.get("complete"), "metrics": metrics,
        "mean_abs_error": float(sum(finite) / len(finite)) if finite else math.nan,
    }
    write_json_atomic(run_dir / "hil_validation.json", record)
    write_text_atomic(run_dir / "hil_validation.html", _html(record, rows, run_dir, simulated.timeseries))
    return {**record, "table": rows}


def _html(record: dict[str, Any], rows: list[list[str]], run_dir: Path, simulated_ts: Any) -> str:
    import pandas as pd

    facts = (f"<p>{html.escape(str(record['scenario']))}, policy {html.escape(str(record['policy']))}, "
             f"{record['duration_s']:.1f} s; measured through {html.escape(str(record['endpoint']))} (speed-up "
             f"{record['speedup']}), simulated by pals. Error = (simulated − measured) / measured.</p>")
    figures = []
    ts_path = run_dir / "timeseries.parquet"
    if ts_path.is_file():
        measured_ts = pd.read_parquet(ts_path)
        for make in (power_figure, throughput_figure):
            fig = make(measured_ts)
            for trace in fig.data:
                trace.name = f"measured: {trace.name}"
            sim_fig = make(simulated_ts)
            for trace in sim_fig.data:
                if trace.name != "budget":
                    trace.name = f"simulated: {trace.name}"
                    trace.line = {"dash": "dot"}
                    fig.add_trace(trace)
            figures.append(fig)
    return render_report(f"pals hil validate: {record['scenario']}",
                         [("Measured vs simulated", facts + table_html(["metric", "measured", "simulated",
                                                                         "error %"], rows))], figures)
