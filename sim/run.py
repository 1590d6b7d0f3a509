"""Run a scenario and write its outputs: scenario.resolved.yaml, requests.parquet, timeseries.parquet,
summary.json, report.html (each written atomically)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sim.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from sim.metrics import requests_frame, summarize, timeseries_frame
from sim.plant import simulate
from sim.report import run_report
from sim.scenario import Scenario, scenario_to_yaml


@dataclass
class RunOutputs:
    """A finished run's tables and summary."""

    summary: dict[str, Any]
    requests: pd.DataFrame
    timeseries: pd.DataFrame


def run_scenario(scenario: Scenario) -> RunOutputs:
    """Simulate a scenario and aggregate its records."""
    result = simulate(scenario)
    requests = requests_frame(result)
    timeseries = timeseries_frame(result)
    return RunOutputs(summarize(result, requests, timeseries), requests, timeseries)


def write_outputs(out_dir: str | Path, scenario: Scenario, outputs: RunOutputs, report: bool = True) -> None:
    """Write a run's files into ``out_dir``."""
    out = Path(out_dir)
    resolved = scenario_to_yaml(scenario)
    write_text_atomic(out / "scenario.resolved.yaml", resolved)
    write_parquet_atomic(out / "requests.parquet", outputs.requests)
    write_parquet_atomic(out / "timeseries.parquet", outputs.timeseries)
    write_json_atomic(out / "summary.json", outputs.summary)
    if report:
        write_text_atomic(out / "report.html", run_report(outputs.summary, outputs.requests, outputs.timeseries,
                                                          resolved))
    else:  # a report left by an earlier run into this folder would describe other results
        (out / "report.html").unlink(missing_ok=True)
