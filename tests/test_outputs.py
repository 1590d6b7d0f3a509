"""What `pals run` writes: every file, the summary's keys, the report's figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from sim.metrics import REQUEST_COLUMNS
from sim.plant import TIMESERIES_COLUMNS
from sim.run import run_scenario, write_outputs
from sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"requests_completed", "requests_dropped", "output_tokens", "throughput_tokens_per_s", "energy_j",
                "avg_power_w", "tokens_per_j", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s",
                "e2e_p99_s", "slo_attainment", "budget_violation_fraction", "sim_events", "wall_s"}


def test_run_writes_every_output(tmp_path):
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["duration_s=60"])
    out = run_scenario(sc)
    write_outputs(tmp_path, sc, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html", "requests.parquet", "scenario.resolved.yaml", "summary.json", "timeseries.parquet"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["totals"]) >= SUMMARY_KEYS
    assert set(summary["deployments"]["chat"]) >= SUMMARY_KEYS
    req = pd.read_parquet(tmp_path / "requests.parquet")
    assert list(req.columns) == list(REQUEST_COLUMNS)
    ts = pd.read_parquet(tmp_path / "timeseries.parquet")
    assert list(ts.columns) == list(TIMESERIES_COLUMNS)
    # One row per control period and GPU: 4 GPUs x 120 half-second windows.
    assert len(ts) == 4 * 120 and sorted(ts["gpu"].unique()) == [0, 1, 2, 3]
    assert set(ts["budget_w"]) == {2400.0}
    # Summary figures follow from the records.
    t = summary["totals"]
    assert t["requests_completed"] == (req["status"] == "completed").sum()
    assert t["energy_j"] == sum(ts.groupby("gpu")["energy_j"].max())
    assert t["tokens_per_j"] == t["output_tokens"] / t["energy_j"]
    resolved = yaml.safe_load((tmp_path / "scenario.resolved.yaml").read_text())
    assert resolved["duration_s"] == 60 and resolved["deployments"][0]["engine"]["block_size"] == 16
    html = (tmp_path / "report.html").read_text()
    for title in ("GPU power vs budget", "Output throughput", "Knobs and response", "Latency CDFs"):
        assert title in html
    assert "plotly" in html.lower()


def test_budget_violations_are_counted_against_the_budget_in_force(tmp_path):
    # 2 replicas x TP2 mixtral at a high rate draw more than a 600 W budget: every window violates it.
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["duration_s=20", "power.budget_w=600"])
    out = run_scenario(sc)
    per_window = out.timeseries.groupby("time_s")["power_w"].sum()
    expected = (per_window > 600 * 1.001).mean()  # 0.1 % tolerance (sim.metrics.BUDGET_TOLERANCE)
    assert out.summary["totals"]["budget_violation_fraction"] == expected > 0.9


def test_compare_writes_each_policy_and_one_report(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sim.cli", "compare", str(ROOT / "scenarios" / "quickstart.yaml"),
           "--policies", "static,pals", "--out", str(tmp_path / "cmp"), "--set", "duration_s=20"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "static" in done.stdout and "pals" in done.stdout
    out = tmp_path / "cmp"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "pals", "report.html", "static"]
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["policies"]) == {"static", "pals"}
    assert (out / "pals" / "summary.json").is_file() and not (out / "pals" / "report.html").exists()
    # An unknown policy fails before anything runs.
    bad = subprocess.run([*cmd[:6], "static,nope", "--out", str(tmp_path / "bad"), "--set", "duration_s=20"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown policy 'nope'" in bad.stderr
    assert not (tmp_path / "bad").exists()
