"""Cases found in review: each once broke an invariant."""

from __future__ import annotations

import math

import pytest

from sim.run import run_scenario
from sim.workload import MAX_DROPS_IN_A_ROW
from tests.conftest import tiny
from tests.userpolicy import Recorder


def test_long_decode_stretch_stays_under_the_cap():
    # 256 sequences decoding 1,000 tokens under a cap: once the governor checked only a stretch's ends, and an
    # iteration where the step turned from one roofline regime to the other drew more than the cap (the peak at
    # such a turn: tests/test_physics.py); every window must stay under the cap, and the cap must bind.
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
    # Every request is too long: after MAX_DROPS_IN_A_ROW drops in a row each client stops at its next drop.
    assert len(out.requests) == MAX_DROPS_IN_A_ROW + 2 and (out.requests["status"] == "dropped").all()
    assert out.summary["totals"]["duration_s"] == 0.0  # all at one instant, then nothing left to run


def test_a_closed_loop_client_goes_on_after_a_dropped_request():
    # Prompts around the context limit: some are dropped as too long, and their clients send the next one (once,
    # a drop retired its client for good and the run ended early with its clients gone).
    lengths = {"prompt_tokens": {"dist": "uniform", "low": 1000, "high": 3000}, "output_tokens": 10}
    out = run_scenario(tiny({"kind": "closed-loop", "clients": 4, "think_time_s": 0.1, **lengths},
                            engine={"max_model_len": 2048}, duration_s=30))
    status = out.requests["status"]
    assert (status == "dropped").sum() > 10 and (status == "completed").sum() > 10
    assert out.summary["totals"]["duration_s"] == pytest.approx(30.0)


def test_an_endless_closed_loop_lasts_the_run_even_when_its_clients_think_past_the_end():
    # One client, a think time far beyond the run: after its first request it would come back after the end.
    # The run still lasts duration_s (once it ended at that request's completion and overstated throughput).
    out = run_scenario(tiny({"kind": "closed-loop", "clients": 1, "think_time_s": 1e4, "prompt_tokens": 100,
                             "output_tokens": 20}, duration_s=30, seed=1))
    totals = out.summary["totals"]
    assert totals["duration_s"] == pytest.approx(30.0)
    assert totals["throughput_tokens_per_s"] == pytest.approx(out.requests["generated_tokens"].sum() / 30.0)
    # A finite closed loop still ends the run once its requests are all served, even after one of its clients
    # was cut off by the end: three clients, six requests, think times of ~20 s in a 60 s run.
    out = run_scenario(tiny({"kind": "closed-loop", "clients": 3, "think_time_s": 20.0, "requests": 6,
                             "prompt_tokens": 100, "output_tokens": 20}, duration_s=60, seed=0))
    assert len(out.requests) == 6 and (out.requests["status"] == "completed").all()
    assert out.summary["totals"]["duration_s"] == pytest.approx(out.requests["finish_s"].max())
    assert out.summary["totals"]["duration_s"] < 60.0


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


def _long_prefills():
    # One 30,000-token prompt per batch, prefilled in one step (~0.5 s at 700 W, ~1.5 s at 200 W), while the
    # cap alternates between 700 and 200 W every 0.5 s period and takes effect at once.
    return tiny({"kind": "static-batches", "batch_size": 1, "prompt_tokens": 30000, "output_tokens": 2},
                engine={"max_num_batched_tokens": 32768, "max_model_len": 32768},
                control={"policy": "tests.userpolicy:AlternatingCap", "period_s": 0.5,
                         "params": {"low": 200, "high": 700, "every": 1}},
                power={"cap_actuation_delay_s": 0.0}, duration_s=20)


def test_a_cap_change_during_a_prefill_step_applies_at_once():
    # Once, a prefill-carrying step kept the clock of the cap it started under: windows under 200 W drew ~700 W.
    out = run_scenario(_long_prefills())
    ts = out.timeseries
    assert set(ts["power_cap_w"]) == {200.0, 700.0}
    assert (ts["power_w"] <= ts["power_cap_w"] * (1 + 1e-9)).all()
    # The step re-timed at each change still records its whole duration as one inter-token gap: energy and the
    # token count agree with the requests.
    assert out.summary["totals"]["output_tokens"] == out.requests["generated_tokens"].sum()


@pytest.mark.parametrize("duration_s", [1.0, 15.0, 7.3])
def test_control_windows_do_not_drift_into_a_sliver(duration_s):
    # Ticks once summed the period: 10 × 0.1 s fell a hair short of 1 s, leaving an 11th window 1e-16 s long
    # whose "power" was rounding noise (512 W under a 400 W cap) and counted as a budget violation.
    sc = tiny({"kind": "poisson", "rate_per_s": 5, "prompt_tokens": 200, "output_tokens": 50},
              control={"policy": "pals", "period_s": 0.1}, power={"budget_w": 400}, duration_s=duration_s)
    out = run_scenario(sc)
    ts = out.timeseries
    expected = math.ceil(duration_s / 0.1 - 1e-6)
    assert len(ts) == expected
    assert ts["window_s"].min() > 0.01
    assert out.summary["totals"]["budget_violation_fraction"] == 0.0
