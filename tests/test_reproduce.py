"""The paper's reproduction, reduced (short runs, A100 only, two models in the single-node study): it runs
end to end, writes its files, and its headline orderings hold."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np

from sim.reproduce import A100, POLICIES, dr_schedule, reproduce


def test_reduced_reproduction(tmp_path):
    platform = replace(A100, single_node_models=("olmoe-1b-7b", "mixtral-8x7b"))
    r = reproduce(tmp_path, quick=True, platforms=(platform,))
    saved = json.loads((tmp_path / "reproduction.json").read_text())
    assert {"single_node", "multi_node", "demand_response"} <= set(saved)
    assert "PALS reproduction" in (tmp_path / "reproduction.md").read_text()
    assert (tmp_path / "report.html").stat().st_size > 100_000

    s1 = r["single_node"]["normalized_tokens_per_j"]
    assert set(s1) == set(POLICIES) and s1["static"] == 1.0
    # Headline orderings: pals beats the static baseline in tokens/J, and at least matches batch-only.
    assert s1["pals"] > 1.05
    assert s1["pals"] >= s1["batch-only"] >= s1["static"]
    # pals comes close to the oracle's gain (the oracle measures the plant; pals predicts it).
    assert r["single_node"]["pals_share_of_oracle_gain"] > 0.8

    qos = r["multi_node"]["qos_violation_fraction"]
    # pals misses its targets no more often than the even split, on average (in these two-minute runs the two can
    # tie to the window: the full reproduction, 0.2 against 2.3 %, is where the gap shows).
    assert np.mean(list(qos["pals"].values())) <= np.mean(list(qos["static"].values()))
    # No deployment is served worse than the even split serves its worst one. (How much the even split starves
    # a model depends on how steeply throughput falls at its ~220 W share, which the calibrated physics puts
    # mostly below the targets' reach in these two-minute runs; per model, a 1e-6 change of the governor's
    # clocks moves a PID's settling by several windows either way, so only the mean and the worst are compared.)
    assert max(qos["pals"].values()) <= max(qos["static"].values())

    dr = r["demand_response"]
    assert set(dr["tracking_error_w"]) == {"cap-only", "pals"}
    assert dr["max_low_power_throughput_gain"] > -0.02  # pals keeps at least the fixed-batch throughput


def test_demand_response_signal_has_three_events():
    sched = dr_schedule(1000.0, 3600.0)
    assert sched[0] == {"at_s": 0.0, "w": 1000.0}
    lows = [p["w"] for p in sched if p["w"] < 1000.0]
    assert lows == [750.0, 550.0, 650.0]
    assert all(b["at_s"] > a["at_s"] for a, b in itertools.pairwise(sched))
