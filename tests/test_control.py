"""Controllers: PID and hysteresis on a toy plant, the choice rule, budget shares, the coordinator."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sim.control import Action, ControllerContext, Observation
from sim.control.coordinator import Claim, Split, even_split, need_split
from sim.control.models import Prediction
from sim.control.pid import Hysteresis, Pid
from sim.control.policies import (
    CapOnlyController,
    OracleController,
    PalsController,
    batch_candidates,
    cap_candidates,
    choose,
)
from sim.run import run_scenario
from tests.conftest import tiny


class ToyModel:
    """Throughput grows with batch and (sub-linearly) with the cap; power is capped."""

    def predict(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        b = max_num_seqs
        natural = 100.0 + 3.0 * b
        return Prediction(50.0 * b * min(1.0, power_cap_w / natural) ** 0.5, min(power_cap_w, natural))


def _ctx(**kw) -> ControllerContext:
    base = dict(deployment="d", num_gpus=1, power_limit_range_w=(100.0, 300.0), default_power_limit_w=300.0,
                max_num_seqs=4, period_s=0.5, power_cap_w=None, control_max_num_seqs=None,
                params={"cap_step_w": 100.0, "target_margin": 0.0, "smoothing": 1.0}, model=ToyModel())
    base.update(kw)
    return ControllerContext(**base)


def _obs(tput: float, target: float = 180.0, budget: float = math.inf, t: float = 0.5) -> Observation:
    return Observation(time_s=t, window_s=0.5, deployment="d", output_tokens_per_s=tput, gpu_power_w=(150.0,),
                       power_cap_w=(300.0,), power_limit_range_w=(100.0, 300.0), max_num_seqs=4, queue_len=0,
                       running=4, ttft_p50_s=math.nan, tpot_p50_s=math.nan, budget_w=budget,
                       throughput_target_tokens_per_s=target)


def _knobs(a: Action) -> tuple[float, int]:
    return a.power_cap_w[0], a.max_num_seqs


def test_candidates():
    assert cap_candidates(100, 400, 50) == [100, 150, 200, 250, 300, 350, 400]
    assert cap_candidates(200, 700, 75)[-1] == 700
    assert batch_candidates(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_candidates(48) == [1, 2, 4, 8, 16, 32, 48]


def test_pid_step_response():
    pid = Pid(kp=0.5, ki=0.2, limit=0.5)
    assert pid.update(0.1, 0.5) == pytest.approx(1 + 0.05 + 0.2 * 0.05)
    assert pid.update(0.1, 0.5) == pytest.approx(1 + 0.05 + 0.2 * 0.10)
    # Saturation: the output is clamped and the integrator stops growing.
    integral = pid.integral
    assert pid.update(10.0, 0.5) == 1.5
    assert pid.integral == integral


def test_hysteresis_needs_persistence():
    h = Hysteresis(threshold=0.05, periods=3)
    assert [h.update(e) for e in (0.1, 0.1, 0.01, 0.1, 0.1, 0.1, 0.1)] == [False, False, False, False, False, True,
                                                                             False]


def test_pals_reconfigures_only_when_the_error_persists():
    # Toy: with target 180 the most efficient candidate is cap 100 W / batch 4 (predicted 189 tok/s).
    # The plant delivers 160: after 3 periods beyond 5 %, the PID-corrected target (x1.089 = 196) rules it out
    # and the controller moves to 200 W. Then the plant delivers 200 (error -11 %): 3 periods later the
    # correction has fallen to 0.944 (target 170) and it returns to 100 W.
    ctrl = PalsController(_ctx())
    seq = [_knobs(ctrl.decide(_obs(0.0, t=0.0)))]
    seq += [_knobs(ctrl.decide(_obs(160.0))) for _ in range(3)]
    seq += [_knobs(ctrl.decide(_obs(200.0))) for _ in range(3)]
    assert seq == [(100, 4), (100, 4), (100, 4), (200, 4), (200, 4), (200, 4), (100, 4)]


def test_budget_change_applies_at_once():
    ctrl = PalsController(_ctx())
    ctrl.decide(_obs(0.0, target=math.nan, t=0.0))  # no target, no budget: most tokens/J
    assert _knobs(ctrl.decide(_obs(150.0, target=math.nan))) == (100, 4)
    # A budget appears: highest throughput within 250 W, at once, without waiting for the error to persist.
    assert _knobs(ctrl.decide(_obs(150.0, target=math.nan, budget=250.0))) == (200, 4)
    # The share itself is a candidate: a 120 W budget is used to the watt.
    assert _knobs(ctrl.decide(_obs(150.0, target=math.nan, budget=120.0))) == (120, 4)


def test_infeasible_target_falls_back_to_max_throughput_within_budget():
    model = ToyModel()
    best = choose(model, [100, 200, 300], [1, 2, 4], 1, 1e9, math.inf)
    assert (best.power_cap_w, best.max_num_seqs) == (200, 4)  # 200 tok/s; 300 W gives no more: lower cap wins
    within = choose(model, [100, 200, 300], [1, 2, 4], 1, 1e9, 150.0)
    assert (within.power_cap_w, within.max_num_seqs) == (150, 4)  # the budget share itself


def test_cap_only_tracks_the_budget_share_without_a_target():
    ctrl = CapOnlyController(_ctx(control_max_num_seqs=2))
    assert _knobs(ctrl.decide(_obs(0.0, target=math.nan, budget=math.inf, t=0.0))) == (300, 2)
    assert _knobs(ctrl.decide(_obs(0.0, target=math.nan, budget=180.0))) == (180, 2)
    assert _knobs(ctrl.decide(_obs(0.0, target=math.nan, budget=50.0))) == (100, 2)  # never below the range


def test_oracle_searches_every_period_without_hysteresis():
    ctrl = OracleController(_ctx())
    assert _knobs(ctrl.decide(_obs(0.0, target=180.0, t=0.0))) == (100, 4)
    assert _knobs(ctrl.decide(_obs(10.0, target=195.0))) == (200, 4)  # at once, no feedback


def test_need_split_covers_targets_that_an_even_split_misses():
    claims = [Claim(4, 100, 400, need_w=1400), Claim(4, 100, 400, need_w=500)]
    even = even_split(2000, claims)
    need = need_split(2000, claims)
    assert even.shares_w == (1000, 1000)
    assert need.shares_w[0] >= 1400 and need.shares_w[1] >= 500
    assert sum(need.shares_w) == pytest.approx(2000)
    # Not enough for both needs: floors, then the same fraction of each need above its floor.
    tight = need_split(1600, claims)
    frac = (1600 - 800) / (1000 + 100)
    assert tight.shares_w == pytest.approx((400 + frac * 1000, 400 + frac * 100))
    assert tight.feasible
    # Below the sum of floors: infeasible, everyone at the floor, never above.
    low = need_split(600, claims)
    assert not low.feasible and low.shares_w == (400, 400)
    # A share never passes a deployment's ceiling.
    assert need_split(10_000, claims).shares_w == (1600, 1600)


def test_pals_never_exceeds_its_budget_share():
    sc = tiny({"kind": "poisson", "rate_per_s": 14, "prompt_tokens": {"dist": "lognormal", "median": 1000,
                                                                        "sigma": 0.9, "max": 8000},
               "output_tokens": {"dist": "lognormal", "median": 130, "sigma": 1.0, "max": 2000}},
              model="mixtral-8x7b", tensor=2, replicas=2, duration_s=120,
              control={"policy": "pals"},
              power={"budget_w": [{"at_s": 0, "w": 2400}, {"at_s": 40, "w": 1200}, {"at_s": 80, "w": 2000}],
                     "cap_actuation_delay_s": 0.0})
    out = run_scenario(sc)
    ts = out.timeseries
    per_window = ts.groupby("time_s").agg(caps=("power_cap_w", "sum"), share=("budget_share_w", "first"),
                                         power=("power_w", "sum"))
    assert (per_window["caps"] <= per_window["share"] + 1e-6).all()
    # Power follows within a step: only the window in which the budget dropped may carry the step that was
    # already running at the old clock.
    after_drop = per_window.index == 40.5
    assert (per_window["power"][~after_drop] <= per_window["share"][~after_drop] * (1 + 1e-9)).all()
    # In that window the old step's share of the time is at most the old share, the rest at most the new one.
    assert (per_window["power"][after_drop] <= per_window["share"].loc[40.0] * (1 + 1e-9)).all()
    assert out.summary["totals"]["budget_violation_fraction"] <= 1 / len(per_window)
    static = run_scenario(sc.model_copy(update={"control": sc.control.model_copy(update={"policy": "static"})}))
    assert static.summary["totals"]["budget_violation_fraction"] > 0.1


def test_budget_below_the_lowest_caps_is_reported_infeasible():
    sc = tiny({"kind": "poisson", "rate_per_s": 5, "prompt_tokens": 500, "output_tokens": 100},
              replicas=2, duration_s=20, control={"policy": "pals"}, power={"budget_w": 300})
    out = run_scenario(sc)
    t = out.summary["totals"]
    assert t["budget_infeasible_fraction"] == 1.0
    assert (out.timeseries["power_cap_w"] == 200).all()  # every GPU held at its lowest cap


def test_even_split_gives_no_deployment_less_than_its_floor():
    # Two H100s (lowest cap 200 W) and two A100s (100 W) under 700 W: even by GPU count would give each GPU
    # 175 W, below the H100s' lowest cap, so the budget would be broken although it covers the floors (600 W).
    claims = [Claim(2, 200.0, 700.0), Claim(2, 100.0, 400.0)]
    split = even_split(700.0, claims)
    assert split.feasible and split.shares_w == (400.0, 300.0)
    assert sum(split.shares_w) == 700.0
    assert even_split(2000.0, claims).shares_w == (1000.0, 1000.0)  # no floor binds: by GPU count
    assert even_split(500.0, claims) == Split((250.0, 250.0), False)  # below the floors: infeasible, said so


def test_a_share_moved_by_the_coordinator_keeps_the_feedback():
    # The plant delivers less than the model predicts: the PID builds a correction. A share the coordinator
    # moves under the same scenario budget re-plans with it; a new scenario budget starts afresh.
    c = PalsController(_ctx())
    c.decide(replace(_obs(160.0, budget=300.0, t=0.0), scenario_budget_w=600.0))
    for t in range(1, 4):
        c.decide(replace(_obs(160.0, budget=300.0, t=0.5 * t), scenario_budget_w=600.0))
    built = c.correction
    assert built > 1.0
    c.decide(replace(_obs(160.0, budget=290.0, t=2.5), scenario_budget_w=600.0))  # the coordinator moved 10 W
    assert c.correction >= built and c.pid.integral > 0.0
    c.decide(replace(_obs(160.0, budget=250.0, t=3.0), scenario_budget_w=500.0))  # a new budget
    assert c.correction == 1.0 and c.pid.integral == 0.0
