"""The load generator replays the simulator's workload: same seed, same requests.

Open-loop and trace workloads: the requests issued over the scenario equal the simulator's (arrival times,
prompt and output tokens), exactly. Closed loops and static batches: driven by the simulator's own finish
times, the replay issues exactly the requests the simulator issued (the next ones depend on completions, and
are drawn from the same stream in the same order)."""

from __future__ import annotations

import heapq
import math
from pathlib import Path

import pytest

from hil.loadgen import WorkloadReplay, planned_requests
from sim.plant import SimPlant
from sim.workload import Request
from tests.conftest import tiny

TOKENS = {"prompt_tokens": {"dist": "lognormal", "median": 200, "sigma": 0.6, "max": 2000},
          "output_tokens": {"dist": "lognormal", "median": 60, "sigma": 0.8, "max": 500}}


def _key(r: Request) -> tuple:
    return (r.id, r.arrival_s, r.prompt_tokens, r.output_tokens)


def _simulated(scenario) -> list[Request]:
    return SimPlant(scenario).run().deployments[0].requests


@pytest.mark.parametrize("workload", [
    {"kind": "poisson", "rate_per_s": 7.0, **TOKENS},
    {"kind": "gamma", "rate_per_s": 3.0, "cv": 2.5, **TOKENS},
    {"kind": "poisson", "rate_per_s": 50.0, "requests": 40, **TOKENS},
])
def test_open_loop_requests_equal_the_simulators(workload: dict) -> None:
    sc = tiny(workload, duration_s=30.0, seed=11)
    planned = planned_requests(sc)
    simulated = _simulated(sc)
    assert len(planned) > 20
    assert [_key(r) for r in planned] == [_key(r) for r in simulated]


def test_trace_requests_equal_the_simulators(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" +
                     "".join(f"{0.37 * i:.3f},{100 + 7 * i},{10 + i % 9}\n" for i in range(60)))
    sc = tiny({"kind": "trace", "path": str(trace), "format": "csv", "time_scale": 0.5}, duration_s=8.0)
    planned = planned_requests(sc)
    assert [_key(r) for r in planned] == [_key(r) for r in _simulated(sc)]
    assert len(planned) == sum(1 for i in range(60) if 0.37 * i * 0.5 < 8.0)


def test_a_different_seed_gives_different_requests() -> None:
    w = {"kind": "poisson", "rate_per_s": 5.0, **TOKENS}
    a, b = planned_requests(tiny(w, seed=1)), planned_requests(tiny(w, seed=2))
    assert [_key(r) for r in a] != [_key(r) for r in b]


def _replay_with_simulated_finishes(scenario) -> tuple[list[Request], list[Request]]:
    """Drive the replay with the simulator's own finish times: each request settles when it did there."""
    simulated = {r.id: r for r in _simulated(scenario)}
    issued: list[Request] = []
    replay = WorkloadReplay(scenario, 0, issued.append)
    settles: list[tuple[float, int, Request]] = []
    seen = 0
    replay.advance(0.0)
    while True:
        for r in issued[seen:]:
            sim = simulated[r.id]
            if math.isfinite(sim.finish_s):
                heapq.heappush(settles, (sim.finish_s, r.id, r))
        seen = len(issued)
        due = replay.next_due_s()
        fin = settles[0][0] if settles else math.inf
        if math.isinf(due) and math.isinf(fin):
            break
        if due <= fin:
            replay.advance(due)
        else:
            t, _, r = heapq.heappop(settles)
            replay.settle(r, t)
    return issued, sorted(simulated.values(), key=lambda r: r.id)


@pytest.mark.parametrize("workload", [
    {"kind": "closed-loop", "clients": 6, "think_time_s": 0.8, **TOKENS},
    {"kind": "static-batches", "batch_size": 8, **TOKENS},
])
def test_completion_driven_workloads_follow_the_simulator(workload: dict) -> None:
    sc = tiny(workload, duration_s=20.0, seed=5)
    issued, simulated = _replay_with_simulated_finishes(sc)
    assert len(simulated) > 2 * (workload.get("clients") or workload.get("batch_size"))
    assert [_key(r) for r in issued] == [_key(r) for r in simulated]
