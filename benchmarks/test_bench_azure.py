"""Speed: replay the Azure LLM 2023 conversation trace (19,366 requests, one hour) on Llama-3.1-70B,
2 replicas of 4xH100 SXM (TP4), static control every 0.5 s.

Targets: >= 25,000 simulated requests per wall-second for the simulation itself; the whole `pals run`
(imports and outputs included) under 6 s; sim_events growing < 1.5x when every output is 10x longer.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from sim.plant import simulate
from sim.scenario import load_scenario
from sim.workload import load_trace

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "azure_conv_llama70b.yaml"
TRACE = ROOT.parent / "shared" / "data" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"

pytestmark = pytest.mark.skipif(not TRACE.is_file(), reason=f"reference trace not available: {TRACE}")


def test_simulation_speed(benchmark):
    sc = load_scenario(SCENARIO)
    # Collect the previous round's garbage before each round: a round measures one simulation, as in a
    # fresh `pals run`, not the collection of the runs before it.
    result = benchmark.pedantic(simulate, setup=lambda: (gc.collect(), ((sc,), {}))[1], rounds=7, iterations=1,
                                warmup_rounds=1)
    n = sum(len(d.requests) for d in result.deployments)
    assert n == 19366
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(requests=n, sim_events=result.sim_events,
                                requests_per_wall_s_best=n / best,
                                requests_per_wall_s_median=n / benchmark.stats.stats.median)
    print(f"\nsimulation: {n / benchmark.stats.stats.median:,.0f} requests per wall-second (median), "
          f"{n / best:,.0f} (best); {result.sim_events:,} events")


def test_whole_pals_run(benchmark, tmp_path):
    pals = Path(sys.executable).with_name("pals")
    cmd = [str(pals), "run", str(SCENARIO), "--out", str(tmp_path / "out")]
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, capture_output=True), rounds=3, iterations=1)
    assert (tmp_path / "out" / "report.html").is_file()
    print(f"\nwhole `pals run`: {benchmark.stats.stats.median:.2f} s median")


def test_events_grow_with_requests_not_tokens(benchmark, tmp_path):
    df = load_trace(TRACE, "azure")
    long = df.assign(output_tokens=df["output_tokens"] * 10)
    path = tmp_path / "conv_x10.csv"
    long.to_csv(path, index=False)
    base = simulate(load_scenario(SCENARIO))
    sc = load_scenario(SCENARIO, [f"deployments.0.workload.path={path}", "deployments.0.workload.format=csv",
                                  "duration_s=100000"])
    x10 = benchmark.pedantic(simulate, args=(sc,), rounds=1, iterations=1)
    ratio = x10.sim_events / base.sim_events
    benchmark.extra_info.update(events_base=base.sim_events, events_x10=x10.sim_events, ratio=ratio)
    print(f"\nsim_events: {base.sim_events:,} -> {x10.sim_events:,} with outputs x10 (ratio {ratio:.2f})")
    assert ratio < 1.5
