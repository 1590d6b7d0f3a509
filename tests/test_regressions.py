"""Cases found in review: each once broke an invariant."""

from __future__ import annotations

import math

from sim.run import run_scenario
from tests.conftest import tiny
from tests.userpolicy import Recorder


def test_long_decode_stretch_stays_under_the_cap():
    # 256 sequences decoding 1,000 tokens: each step turns from compute- to memory-bound mid-stretch, where
    # per-iteration power peaks; the governor must hold the peak under the cap, not just the ends.
    sc = tiny({"kind": "static-batches", "batch_size": 256, "requests": 256, "prompt_tokens": 100,
               "output_tokens": 1000}, engine={"max_num_seqs": 256}, control={"power_cap_w": 330},
              power={"cap_actuation_delay_s": 0.0}, duration_s=600)
    ts = run_scenario(sc).timeseries
    assert (ts["power_w"] <= ts["power_cap_w"] * (1 + 1e-9)).all()
    assert ts["power_w"].max() > 0.98 * 330  # and the cap binds


def test_requests_dropped_at_time_zero_by_batch_and_closed_loop_sources():
    too_long = {"prompt_tokens": 3000, "output_tokens": 10}
    out = run_scenario(tiny({"kind": "static-batches", "batch_size": 4, "requests": 8, **too_long},
                            engine={"max_model_len": 2048}))
    assert (out.requests["status"] == "dropped").all() and len(out.requests) == 4  # the source stops
    out = run_scenario(tiny({"kind": "closed-loop", "clients": 3, "think_time_s": 0.0, **too_long},
                            engine={"max_model_len": 2048}, duration_s=100))
    assert len(out.requests) == 3 and (out.requests["status"] == "dropped").all()  # clients give up


def test_unfinished_requests_report_the_tokens_they_generated():
    out = run_scenario(tiny({"kind": "static-batches", "batch_size": 8, "requests": 8, "prompt_tokens": 100,
                             "output_tokens": 2000}, duration_s=5))
    assert out.summary["totals"]["requests_completed"] == 0
    assert out.requests["generated_tokens"].sum() == out.summary["totals"]["output_tokens"] > 8


def test_observation_sees_ttft_in_the_window_of_the_first_token_and_the_budget_from_the_start():
    sc = tiny({"kind": "static-batches", "batch_size": 1, "requests": 1, "prompt_tokens": 100, "output_tokens": 1000},
              control={"policy": "tests.userpolicy:Recorder", "period_s": 0.5}, power={"budget_w": 300},
              duration_s=60)
    req = run_scenario(sc).requests.iloc[0]
    seen = Recorder.seen
    assert seen[0].time_s == 0 and seen[0].budget_w == 300
    with_ttft = [o for o in seen if not math.isnan(o.ttft_p50_s)]
    assert len(with_ttft) == 1
    assert with_ttft[0].time_s - with_ttft[0].window_s <= req.first_token_s <= with_ttft[0].time_s
    assert with_ttft[0].ttft_p50_s == req.first_token_s - req.arrival_s
