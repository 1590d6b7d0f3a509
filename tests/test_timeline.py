"""Exact timelines on tiny cases, computed by hand from the physics' step formulas, one iteration at a time."""

from __future__ import annotations

import pandas as pd
import pytest

from sim.build import build_physics
from sim.physics import StepWork
from sim.plant import simulate
from sim.run import run_scenario
from tests.conftest import tiny

REL = 1e-12


def _decode_iteration_s(phys, contexts: list[int]) -> float:
    """One decode iteration of sequences whose caches hold ``contexts`` tokens (each attends cache + itself)."""
    n = len(contexts)
    ctx = sum(c + 1 for c in contexts)
    return phys.step_time_s(phys.step_work(n, n, n, ctx, ctx), 1.0)


def _prefill_s(phys, prompt: int, decodes: list[int] = ()) -> float:
    """A step that prefills ``prompt`` tokens of one new request alongside decodes."""
    n = len(decodes)
    ctx = sum(c + 1 for c in decodes)
    pairs = ctx + prompt * (prompt + 1) / 2
    kv = ctx + prompt
    return phys.step_time_s(phys.step_work(n + prompt, n + 1, n + 1, pairs, kv, num_new=1), 1.0)


def test_single_request_timeline_is_prefill_then_decodes():
    sc = tiny({"kind": "poisson", "rate_per_s": 1.0, "requests": 1, "prompt_tokens": 100, "output_tokens": 5})
    phys = build_physics(sc, sc.deployments[0])
    result = simulate(sc)
    req = result.deployments[0].completed[0]
    t_first = req.arrival_s + _prefill_s(phys, 100)
    # 4 more tokens: decode iterations over caches of 100, 101, 102, 103 tokens.
    t_finish = t_first + sum(_decode_iteration_s(phys, [100 + j]) for j in range(4))
    assert req.first_token_s == pytest.approx(t_first, rel=REL)
    assert req.finish_s == pytest.approx(t_finish, rel=REL)
    assert req.generated == 5
    # The run ends as soon as the finite workload is served.
    assert result.end_s == pytest.approx(t_finish, rel=REL)
    # NVML-style utilization: a kernel ran for every step less its host wait (scheduling, request set-up); the
    # GPU idled before the arrival.
    prefill = phys.step_work(100, 1, 1, 100 * 101 / 2, 100, num_new=1)
    decodes = [phys.step_work(1, 1, 1, 101 + j, 101 + j) for j in range(4)]
    assert prefill.host_s > 0 and prefill.launch_s == 0  # graphed steps: no wait for launches
    kernel_s = (t_first - req.arrival_s - prefill.host_s) + sum(phys.step_time_s(w, 1.0) - w.host_s for w in decodes)
    gpu = result.deployments[0].gpus[0]
    assert gpu.get_busy_time_s() == pytest.approx(kernel_s, rel=1e-9)
    assert gpu.get_utilization() == pytest.approx(kernel_s / t_finish, rel=1e-9)


def test_inter_token_latency_counts_every_gap_between_tokens():
    # Two requests prefilled together, then 3 decode iterations for both: 6 gaps, two of each iteration's duration.
    sc = tiny({"kind": "static-batches", "batch_size": 2, "requests": 2, "prompt_tokens": 100, "output_tokens": 4})
    phys = build_physics(sc, sc.deployments[0])
    out = run_scenario(sc)
    gaps = [_decode_iteration_s(phys, [100 + j, 100 + j]) for j in range(3)]
    assert gaps[0] < gaps[1] < gaps[2]
    t = out.summary["totals"]
    assert t["itl_p50_s"] == pytest.approx(gaps[1], rel=1e-9)  # the middle iteration (durations grow linearly)
    assert gaps[1] < t["itl_p99_s"] <= gaps[2] * (1 + 1e-12)
    # TPOT is each request's mean gap: here the same, since every request saw every iteration.
    assert t["tpot_p50_s"] == pytest.approx(sum(gaps) / 3, rel=1e-9)


def test_second_arrival_joins_at_the_next_iteration_boundary(tmp_path):
    # Request A (prompt 50, 200 tokens) at t=0; request B arrives mid-decode and must wait for the iteration
    # in flight to end, then is prefilled in a step that also decodes A.
    csv = tmp_path / "t.csv"

    def build(b_arrival: float):
        pd.DataFrame({"arrival_s": [0.0, b_arrival], "prompt_tokens": [50, 30], "output_tokens": [200, 3]}).to_csv(
            csv, index=False)
        return tiny({"kind": "trace", "path": str(csv), "format": "csv"})

    sc0 = build(0.1)
    phys = build_physics(sc0, sc0.deployments[0])
    t = _prefill_s(phys, 50)  # A's prefill ends: its first token
    boundaries = [t]
    ctx = 50
    while t < 0.1:
        t += _decode_iteration_s(phys, [ctx])
        ctx += 1
        boundaries.append(t)
    b_arrival = 0.5 * (boundaries[-2] + boundaries[-1])  # strictly inside the iteration in flight
    res = simulate(build(b_arrival))
    reqs = {r.id: r for r in res.deployments[0].completed}
    a, b = reqs[0], reqs[1]
    assert a.first_token_s == pytest.approx(boundaries[0], rel=REL)
    # B's prefill starts at the end of the iteration in flight, with A decoding beside it (A's cache: ctx).
    t_b_first = boundaries[-1] + _prefill_s(phys, 30, decodes=[ctx])
    assert b.first_token_s == pytest.approx(t_b_first, rel=REL)
    # Then both decode together: B needs 2 more tokens.
    t = t_b_first
    a_ctx, b_ctx = ctx + 1, 30
    for _ in range(2):
        t += _decode_iteration_s(phys, [a_ctx, b_ctx])
        a_ctx += 1
        b_ctx += 1
    assert b.finish_s == pytest.approx(t, rel=REL)
    # A's tokens: 1 at prefill, one per iteration since; it finishes after 199 decode iterations in all.
    assert a.generated == 200


def test_static_batches_start_when_the_previous_batch_ends():
    sc = tiny({"kind": "static-batches", "batch_size": 3, "requests": 9, "prompt_tokens": 64, "output_tokens": 8})
    out = run_scenario(sc)
    df = out.requests.sort_values("request_id")
    arrivals = sorted(df["arrival_s"].unique())
    assert len(arrivals) == 3
    for i in range(1, 3):
        previous = df[df["arrival_s"] == arrivals[i - 1]]
        assert arrivals[i] == previous["finish_s"].max()
    # Identical requests in a batch are served in lockstep: they finish together.
    for t in arrivals:
        assert df[df["arrival_s"] == t]["finish_s"].nunique() == 1


def test_mixed_step_with_prefill_chunks_respects_token_budget():
    # A 150-token prompt with max_num_batched_tokens=64 is prefilled in 3 chunks (64, 64, 22); chunks this
    # small stay below the default power limit, so the clock stays at its max.
    sc = tiny({"kind": "poisson", "rate_per_s": 1.0, "requests": 1, "prompt_tokens": 150, "output_tokens": 2},
              engine={"max_num_batched_tokens": 64, "max_num_seqs": 8})
    phys = build_physics(sc, sc.deployments[0])
    res = simulate(sc)
    req = res.deployments[0].completed[0]
    t = req.arrival_s
    done = 0
    for c in (64, 64, 22):
        pairs = c * done + c * (c + 1) / 2
        last = done + c == 150
        assert phys.clock_for_cap(phys.step_work(c, 1, 1, pairs, done + c), 700.0) == 1.0
        t += phys.step_time_s(phys.step_work(c, 1 if last else 0, 1, pairs, done + c, num_new=int(done == 0)), 1.0)
        done += c
    assert req.first_token_s == pytest.approx(t, rel=REL)
    assert res.deployments[0].engines[0].iterations == 4  # 3 prefill chunks + 1 decode


def test_step_work_is_linear_in_context_as_the_stretch_assumes():
    sc = tiny({"kind": "poisson", "rate_per_s": 1.0, "prompt_tokens": 10, "output_tokens": 10})
    phys = build_physics(sc, sc.deployments[0])
    w0 = phys.step_work(8, 8, 8, 1000, 1000)
    w1 = phys.step_work(8, 8, 8, 1008, 1008)
    assert isinstance(w0, StepWork)
    assert w1.compute_s - w0.compute_s == pytest.approx(phys.attn_compute_s(8), rel=1e-9)
    assert w1.memory_s - w0.memory_s == pytest.approx(phys.kv_read_s(8), rel=1e-9)
    assert w1.fixed_s == w0.fixed_s
