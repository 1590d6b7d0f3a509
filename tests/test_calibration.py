"""Profile tables, validation and calibration against the real A100/H100 measurements in ../shared/data.

The accuracy tests fit on one part of the data and predict the other with the simulator; they print their
figures (run with ``-s``). Targets are the calibration issue's; where the physics does not reach one yet, the
test is an expected failure that states the target, so that reaching it shows up.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.calibrate import (
    PARAMS,
    CalibrationError,
    FitResult,
    HeldOut,
    any_row_runs_default_moe_config,
    fit,
    held_out_errors,
    mape,
    pooled_mape,
    predict_rows,
    with_params,
    write_calibration,
)
from sim.catalog.calibration import CALIBRATION_DIR, engine_params, gpu_params
from sim.catalog.gpus import GPUS, datasheet_gpu
from sim.catalog.models import load_model
from sim.errors import PalsError
from sim.operating_point import RowPrediction, analytic_row, measured_as_row, row_physics, row_scenario, simulate_row
from sim.physics import EngineOverheads
from sim.profile import (
    MLENERGY_PROMPT_TOKENS_CV,
    ProfileError,
    check_catalog,
    histogram_cv,
    import_argonne,
    import_mlenergy,
    import_pals_a100,
    normalise,
    read_table,
    write_table,
)
from sim.validate import predict_table
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


@cache
def pals() -> pd.DataFrame:
    return import_pals_a100(shared_data("pals_a100", "moe_summary_tp4.csv"))


@cache
def mlenergy() -> pd.DataFrame:
    return import_mlenergy(shared_data("mlenergy_v3"))


@cache
def mlenergy_h100() -> pd.DataFrame:
    t = mlenergy()
    return t[t["gpu"] == "h100-sxm"].reset_index(drop=True)


@cache
def argonne() -> pd.DataFrame:
    return import_argonne(shared_data("argonne", "power_results.csv"))


# ----- the profile table and its readers ------------------------------------------------------------
def test_pals_reader_keeps_every_cap_and_batch():
    t = pals()
    assert len(t) == 4 * 7 * 6  # 4 models x caps 100..400 step 50 x batches 1..64
    assert sorted(set(t["power_cap_w"])) == [100, 150, 200, 250, 300, 350, 400]
    row = t[(t["model"] == "mixtral-8x7b") & (t["power_cap_w"] == 400) & (t["max_num_seqs"] == 64)].iloc[0]
    # The data README quotes this point: 379 W, 435 tok/s.
    assert row["power_w_per_gpu"] == pytest.approx(379, abs=1)
    assert row["throughput_tokens_per_s"] == pytest.approx(435, abs=1)
    # NVML utilization (percent of the time a kernel ran) becomes a fraction: 96.7 % here.
    assert row["gpu_busy_fraction"] == pytest.approx(0.967, abs=5e-4)
    assert t["gpu_busy_fraction"].between(0.6, 1.0).all()
    assert mlenergy_h100()["gpu_busy_fraction"].isna().all()  # ML.ENERGY did not record it


def test_mlenergy_power_is_per_gpu_and_argonne_is_in_watts():
    t = import_mlenergy(shared_data("mlenergy_v3"))
    raw = json.loads(shared_data("mlenergy_v3", "meta-llama__Llama-3.1-70B-Instruct__lm-arena-chat.json").read_text())
    c = next(c for c in raw["configurations"] if c["gpu_model"] == "H100" and c["max_num_seqs"] == 64)
    row = t[(t["model"] == "llama-3.1-70b") & (t["gpu"] == "h100-sxm") & (t["max_num_seqs"] == 64)].iloc[0]
    assert row["power_w_per_gpu"] == pytest.approx(c["avg_power_watts"] / 4)
    assert row["itl_median_s"] == pytest.approx(c["median_itl_ms"] / 1000)
    assert row["itl_p99_s"] == pytest.approx(c["p99_itl_ms"] / 1000)
    a = argonne()
    assert set(a["gpu"]) == {"a100-sxm4-40gb", "h100-sxm"}  # GH200 is not in the catalog; vLLM rows only
    assert len(a) == 16
    assert a["power_w_per_gpu"].between(150, 700).all()  # milliwatts converted
    # Argonne's "Throughput" counts input and output tokens: output tokens per second are half of it here.
    first = a[(a["gpu"] == "a100-sxm4-40gb") & (a["model"] == "llama-2-7b") & (a["max_num_seqs"] == 64)].iloc[0]
    assert first["throughput_tokens_per_s"] == pytest.approx(1484.8 / 2, rel=1e-3)


def test_pals_reader_takes_utilization_as_a_fraction_and_names_a_bad_cell(tmp_path):
    csv = tmp_path / "moe.csv"
    head = "model,tp,cap_w,batch,avg_Tokens_per_s,avg_gpu_util,avg_gpu_power\n"
    csv.write_text(head + "mixtral-8x7b,4,400,64,434.8,96.7,379.3\nolmoe-1b-7b,4,100,1,150.0,140,99.0\n")
    with pytest.raises(ProfileError, match=r"moe.csv, line 3, column 'avg_gpu_util': expected a percentage in "
                                           r"\(0, 100\], got 140"):
        import_pals_a100(csv)
    csv.write_text(head.replace(",avg_gpu_util", "") + "mixtral-8x7b,4,400,64,434.8,379.3\n")
    assert import_pals_a100(csv)["gpu_busy_fraction"].isna().all()  # an older copy without the column


def test_argonne_power_is_one_gpus_even_on_several(tmp_path):
    # benchmark_power.py probes GPU 0 only (gpuPowerProbe(gpu_id=0)): its avg_power is per GPU at any TP size.
    csv = tmp_path / "power_results.csv"
    csv.write_text("Hardware,Num of Hardware,Framework,Model,Input Output Length,Batch Size,Latency,Throughput,"
                   "avg_power\nNvidia H100 GPU,2,vLLM,meta-llama/Meta-Llama-3-8B,1024,16,10.0,3276.8,450000.0\n")
    row = import_argonne(csv).iloc[0]
    assert (row["num_gpus"], row["tensor_parallel"]) == (2, 2)
    assert row["power_w_per_gpu"] == pytest.approx(450.0)
    assert row["throughput_tokens_per_s"] == pytest.approx(16 * 1024 / 10.0)


def test_argonne_power_means_include_a_second_of_idle_and_predictions_see_the_same_window(tmp_path):
    # benchmark_power.py samples NVML from the start of one generate call until a second after it returns.
    a = argonne()
    assert (a["power_idle_tail_s"] == 1.0).all()
    assert (pals()["power_idle_tail_s"] == 0).all() and (mlenergy_h100()["power_idle_tail_s"] == 0).all()
    row = a[(a["gpu"] == "h100-sxm") & (a["max_num_seqs"] == 1)].iloc[0].copy()
    row["max_num_seqs"], row["output_tokens_mean"] = 2, 100.0
    phys = row_physics(row)
    idle_w = phys.gpu.idle_power_w
    # 2 prompts x 100 tokens at 50 tokens/s: a 4 s batch at 400 W, then 1 s idle.
    seen = measured_as_row(row, phys.gpu, RowPrediction(50.0, 400.0, 0.02, gpu_busy_fraction=0.9))
    assert seen.power_w_per_gpu == pytest.approx((4 * 400.0 + 1 * idle_w) / 5)
    assert seen.gpu_busy_fraction == pytest.approx(0.9 * 4 / 5)  # no kernel runs in the idle second
    assert (seen.throughput_tokens_per_s, seen.itl_median_s) == (50.0, 0.02)
    row["power_idle_tail_s"] = 0.0
    assert measured_as_row(row, phys.gpu, RowPrediction(50.0, 400.0, 0.02)).power_w_per_gpu == 400.0
    # Both predictors apply it: the simulated batch and the closed form agree on the diluted power.
    one = a[(a["gpu"] == "h100-sxm") & (a["max_num_seqs"] == 1)].iloc[0]
    sim, ana = simulate_row(one), analytic_row(one, row_physics(one))
    undiluted = analytic_row(one.drop("power_idle_tail_s"), row_physics(one))
    assert sim.power_w_per_gpu == pytest.approx(ana.power_w_per_gpu, rel=1e-3)
    assert idle_w < ana.power_w_per_gpu < undiluted.power_w_per_gpu
    # A saturated run has no "after the batch": a tail there is refused, naming line and field.
    t = mlenergy_h100().head(3).copy()
    t.loc[1, "power_idle_tail_s"] = 1.0
    path = tmp_path / "t.csv"
    t.to_csv(path, index=False)
    with pytest.raises(ProfileError, match=r"line 3, field 'power_idle_tail_s': expected 0 on a saturate row"):
        read_table(path)


def test_mlenergy_layout_and_output_length_spread_are_read_as_run():
    t = mlenergy_h100()
    # The benchmark starts vLLM with --tensor-parallel-size equal to the GPU count (no data parallelism); the
    # file's "tensor_parallel": 1 describes the MoE layers, whose experts expert parallelism spreads whole.
    big = t[t["model"] == "qwen3-235b-a22b"]
    assert (big["num_gpus"] == 8).all() and (big["tensor_parallel"] == 8).all() and (big["expert_parallel"] == 8).all()
    # Chat output lengths are spread about as widely as an exponential's (cv 1); ML.ENERGY caps them at 4,096.
    assert t["output_tokens_cv"].between(0.8, 1.2).all()
    assert (pals()["output_tokens_cv"] == 0).all() and (argonne()["output_tokens_cv"] == 0).all()
    # Prompt lengths: the files give none; the importer's assumption (see MLENERGY_PROMPT_TOKENS_CV), the others'
    # prompts are all of one length (HellaSwag questions, Argonne's fixed 1,024 tokens).
    assert (t["prompt_tokens_cv"] == MLENERGY_PROMPT_TOKENS_CV).all()
    assert (pals()["prompt_tokens_cv"] == 0).all() and (argonne()["prompt_tokens_cv"] == 0).all()
    # The running batch as measured (vLLM's num_requests_running over the steady state), where the files give it.
    doc = json.loads(shared_data("mlenergy_v3", "Qwen__Qwen3-32B__lm-arena-chat.json").read_text())
    measured = {(c["num_gpus"], c["max_num_seqs"]): c["avg_batch_size"] for c in doc["configurations"]
                if c["gpu_model"] == "H100"}
    q = t[t["model"] == "qwen3-32b"]
    assert {(n, b): r for n, b, r in zip(q["num_gpus"], q["max_num_seqs"], q["running_seqs_mean"], strict=True)} \
        == pytest.approx(measured)
    assert (t["running_seqs_mean"] <= t["max_num_seqs"]).all() and pals()["running_seqs_mean"].isna().all()


def test_a_broken_output_length_histogram_names_the_file_and_configuration(tmp_path):
    src = shared_data("mlenergy_v3", "Qwen__Qwen3-8B__lm-arena-chat.json")
    doc = json.loads(src.read_text())
    doc["configurations"][2]["output_length_distribution"]["counts"].pop()
    bad = tmp_path / "qwen3-8b.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"qwen3-8b.json: not an ML.ENERGY v3 model file \(configurations\[2\]: "
                                           r".*len\(bins\) = len\(counts\) \+ 1"):
        import_mlenergy(bad)


def test_histogram_cv_is_exact_on_bin_middles():
    # Two bins with middles 10 and 30, equal counts: mean 20, standard deviation 10.
    assert histogram_cv({"bins": [0, 20, 40], "counts": [5, 5]}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="len\\(bins\\)"):
        histogram_cv({"bins": [0, 20], "counts": [5, 5]})


def test_table_round_trips_and_bad_rows_name_line_and_field(tmp_path):
    t = pals().head(5)
    path = tmp_path / "t.csv"
    write_table(t, path)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, t, check_exact=False, rtol=1e-5)
    text = path.read_text().splitlines()
    text[3] = text[3].replace("static-batches", "bursty")
    path.write_text("\n".join(text))
    with pytest.raises(ProfileError, match=r"t.csv, line 4, field 'workload': expected one of"):
        read_table(path)
    text = path.read_text().splitlines()
    text[3] = text[3].replace("bursty", "static-batches")
    cv = text[0].split(",").index("output_tokens_cv")
    cells = text[2].split(",")
    cells[cv] = "-0.5"
    text[2] = ",".join(cells)
    path.write_text("\n".join(text))
    with pytest.raises(ProfileError, match=r"line 3, field 'output_tokens_cv': expected a non-negative number"):
        read_table(path)
    # Optional columns may be left out: no spread of output lengths, no ITL measured.
    t.drop(columns=["output_tokens_cv", "itl_median_s", "itl_p99_s", "power_idle_tail_s"]).to_csv(path, index=False)
    back = read_table(path)
    assert (back["output_tokens_cv"] == 0).all() and back["itl_median_s"].isna().all()
    assert back["itl_p99_s"].isna().all() and (back["power_idle_tail_s"] == 0).all()
    # A 99th percentile below the median is a broken row.
    m = mlenergy_h100().head(3).copy()
    m.loc[2, "itl_p99_s"] = 0.5 * m.loc[2, "itl_median_s"]
    m.to_csv(path, index=False)
    with pytest.raises(ProfileError, match=r"line 4, field 'itl_p99_s': expected a 99th percentile no smaller"):
        read_table(path)
    m = pals().head(4).copy()
    m.loc[1, "running_seqs_mean"] = m.loc[1, "max_num_seqs"] + 1.0
    m.to_csv(path, index=False)
    with pytest.raises(ProfileError, match=r"line 3, field 'running_seqs_mean': expected no more than max_num_seqs"):
        read_table(path)
    m = pals().head(4).copy()
    m.loc[2, "gpu_busy_fraction"] = 87.5  # a percentage where a fraction belongs
    m.to_csv(path, index=False)
    with pytest.raises(ProfileError, match=r"line 4, field 'gpu_busy_fraction': expected a fraction in \(0, 1\]"):
        read_table(path)
    m.loc[2, "gpu_busy_fraction"] = math.nan  # not measured on this row
    m.to_csv(path, index=False)
    assert read_table(path)["gpu_busy_fraction"].isna().sum() == 1
    path.write_text("source,gpu\nx,y\n")
    with pytest.raises(ProfileError, match="missing column"):
        read_table(path)


def _row(**change):
    row = {"source": "t", "gpu": "h100-sxm", "model": "llama-3.1-8b", "num_gpus": 2, "tensor_parallel": 1,
           "expert_parallel": 1, "power_cap_w": 700, "max_num_seqs": 8, "workload": "saturate",
           "prompt_tokens_mean": 300, "output_tokens_mean": 300, "output_tokens_cv": 0.5,
           "throughput_tokens_per_s": 1000, "power_w_per_gpu": 400, "itl_median_s": 0.01, "itl_p99_s": 0.02,
           "power_idle_tail_s": 0.0, "running_seqs_mean": 8}
    return pd.DataFrame([{**row, **change}])


@pytest.mark.parametrize(("change", "message"), [
    ({}, None),
    ({"throughput_tokens_per_s": math.inf}, r"line 2, field 'throughput_tokens_per_s': expected a finite number, "
                                            r"got inf"),
    ({"output_tokens_cv": 1e6}, r"field 'output_tokens_cv': expected at most 10"),  # once a division by zero
    ({"prompt_tokens_cv": 11}, r"field 'prompt_tokens_cv': expected at most 10 \(std / mean of the prompt"),
    ({"prompt_tokens_cv": -1}, r"field 'prompt_tokens_cv': expected a non-negative number"),
    ({"num_gpus": 3, "tensor_parallel": 2}, r"field 'num_gpus': expected a multiple of tensor_parallel"),
    ({"num_gpus": 1, "expert_parallel": 4}, r"field 'expert_parallel': expected 1, or a multiple"),
    ({"power_w_per_gpu": -1.5}, r"field 'power_w_per_gpu': expected a positive number, got -1.5$"),  # no np. repr
])
def test_impossible_rows_are_refused_by_line_and_field(change, message):
    if message is None:
        assert len(normalise(_row(), "t.csv")) == 1
        return
    with pytest.raises(ProfileError, match=message):
        normalise(_row(**change), "t.csv")


def test_a_bad_dataset_cell_names_its_line_and_column_in_the_file(tmp_path):
    # Argonne's file separates its rows with blank lines: the line is the file's, not the table's.
    header = "Hardware,Num of Hardware,Framework,Model,Input Output Length,Batch Size,Latency,avg_power"
    ok = "Nvidia A100 GPU,1,vLLM,meta-llama/Llama-2-7b-hf,1024,1,30.0,250000"
    path = tmp_path / "argonne.csv"
    path.write_text("\n".join([header, ok, "", "", ok.replace("250000", "abc")]) + "\n")
    with pytest.raises(ProfileError, match=r"argonne.csv, line 5, column 'avg_power': expected a number, got 'abc'"):
        import_argonne(path)
    path.write_text("\n".join([header, ok, "", ok]) + "\n")
    assert len(import_argonne(path)) == 2


# ----- the two predictors agree ---------------------------------------------------------------------
@pytest.mark.parametrize("pick", [
    ("pals", "mixtral-8x7b", 200, 16), ("pals", "olmoe-1b-7b", 400, 64), ("pals", "deepseek-moe-16b", 100, 1),
    ("mlenergy", "llama-3.1-8b", 700, 128), ("mlenergy", "qwen3-30b-a3b", 700, 64)])
def test_simulator_matches_the_closed_form_steady_state(pick):
    source, model, cap, batch = pick
    t = pals() if source == "pals" else mlenergy_h100()
    row = t[(t["model"] == model) & (t["power_cap_w"] == cap) & (t["max_num_seqs"] == batch)].iloc[0]
    sim, ana = simulate_row(row), analytic_row(row, row_physics(row))
    # Static batches are the same steps either way; a saturated closed loop fluctuates around the steady state.
    tol = 1e-3 if source == "pals" else 0.06
    assert sim.throughput_tokens_per_s == pytest.approx(ana.throughput_tokens_per_s, rel=tol)
    assert sim.power_w_per_gpu == pytest.approx(ana.power_w_per_gpu, rel=tol)
    if source == "mlenergy":  # the median gap between tokens: the median step of the Poisson mix of prefills
        assert sim.itl_median_s == pytest.approx(ana.itl_median_s, rel=0.05)
    if source == "mlenergy":  # nothing limits these: the knob runs full
        assert ana.running_seqs_mean == batch
        assert sim.running_seqs_mean == pytest.approx(batch, rel=0.02)
    # The share of the time a kernel runs (NVML's utilization): the simulated GPUs' ledger and the closed form.
    assert 0.3 < ana.gpu_busy_fraction < 1.0
    assert sim.gpu_busy_fraction == pytest.approx(ana.gpu_busy_fraction, rel=tol if source == "pals" else 0.02)


def test_the_measured_latency_tails_need_prompts_of_varying_length():
    # ML.ENERGY's 99th-percentile inter-token latency is 1.5-8x its median: a few steps carry long prompts. With
    # every prompt of one length the closed form cannot make such a tail; with the importer's log-normal lengths
    # (same mean) it comes within a few tens of per cent, and the median does not get worse.
    t = mlenergy_h100()
    fixed = t.assign(prompt_tokens_cv=0.0)
    spread_p50, spread_p99, fixed_p50, fixed_p99 = [], [], [], []
    for a, b in zip(t.itertuples(index=False), fixed.itertuples(index=False), strict=True):
        pa, pb = analytic_row(a, row_physics(a)), analytic_row(b, row_physics(b))
        spread_p50.append(pa.itl_median_s / a.itl_median_s - 1)
        spread_p99.append(pa.itl_p99_s / a.itl_p99_s - 1)
        fixed_p50.append(pb.itl_median_s / b.itl_median_s - 1)
        fixed_p99.append(pb.itl_p99_s / b.itl_p99_s - 1)
    err = {k: 100 * float(np.mean(np.abs(v))) for k, v in
           [("p50", spread_p50), ("p99", spread_p99), ("p50_fixed", fixed_p50), ("p99_fixed", fixed_p99)]}
    print("\nML.ENERGY H100 ITL MAPE %, varying / fixed prompts: median "
          f"{err['p50']:.1f} / {err['p50_fixed']:.1f}, p99 {err['p99']:.1f} / {err['p99_fixed']:.1f}")
    assert err["p99"] < 0.7 * err["p99_fixed"]
    assert err["p99"] < 30.0
    assert err["p50"] <= err["p50_fixed"] + 0.5
    # Fixed-length prompts underestimate almost every tail (the tails are real, not noise).
    assert np.mean(np.array(fixed_p99) < 0) > 0.8


def test_a_saturate_rows_scenario_draws_prompts_of_its_mean_and_spread():
    row = _row(prompt_tokens_cv=2.0).iloc[0]
    w = row_scenario(row).deployments[0].workload
    mean = w.prompt_tokens.median * math.exp(w.prompt_tokens.sigma ** 2 / 2)  # a log-normal's mean
    assert mean == pytest.approx(300.0, rel=1e-9)
    assert math.sqrt(math.exp(w.prompt_tokens.sigma ** 2) - 1) == pytest.approx(2.0, rel=1e-9)  # its cv
    assert row_scenario(_row(prompt_tokens_cv=0.0).iloc[0]).deployments[0].workload.prompt_tokens.value == 300


def test_prompts_beyond_the_step_budget_are_chunked_alike_in_both_predictors():
    # 4,000-token prompts against an 8,192-token step budget: three prefills at once take two steps. The simulator
    # chunks them step by step; the closed form costs the chunks and lets the decodes beside them replace
    # decode-only steps (each request still yields its 100 tokens). (Prompts longer than the budget on average,
    # 10,000 tokens, come out 13 % fast: the closed form splits a prompt into equal chunks where the engine
    # fills the budget first.)
    row = _row(max_num_seqs=128, prompt_tokens_mean=4000, output_tokens_mean=100, output_tokens_cv=0.0,
               num_gpus=1).iloc[0]
    sim, ana = simulate_row(row), analytic_row(row, row_physics(row))
    assert sim.throughput_tokens_per_s == pytest.approx(ana.throughput_tokens_per_s, rel=0.08)
    assert sim.power_w_per_gpu == pytest.approx(ana.power_w_per_gpu, rel=0.02)
    assert sim.itl_median_s == pytest.approx(ana.itl_median_s, rel=0.05)


@pytest.mark.parametrize(("model", "batch"), [("qwen3-8b", 512), ("llama-3.1-8b", 768)])
def test_the_running_batch_the_kv_cache_holds_matches_the_measured_one(model, batch):
    # On one H100 these 8B models' caches cannot hold that many chat sequences at once: ML.ENERGY measured 474 and
    # 691 running on average (vLLM's num_requests_running). The simulator admits a sequence when its KV blocks
    # are free and knows nothing of the measurement; the closed form divides the cache by the running sequences'
    # mean context, P + O(1 + cv^2)/2, and comes out a few % lower.
    t = mlenergy_h100()
    row = t[(t["model"] == model) & (t["max_num_seqs"] == batch)].iloc[0]
    sim, ana = simulate_row(row), analytic_row(row, row_physics(row))
    assert row["running_seqs_mean"] < 0.95 * batch
    assert sim.running_seqs_mean == pytest.approx(row["running_seqs_mean"], rel=0.03)
    assert ana.running_seqs_mean == pytest.approx(sim.running_seqs_mean, rel=0.07)


def test_predicted_power_respects_every_cap_as_measured():
    # The PALS GPUs hold every cap, down to the lowest limit (98-101 W under 100 W): so does the physics, by duty
    # cycling below the lowest clock where it must.
    v = predict_table(pals(), "pals", "analytic")
    assert (v["predicted_power_w_per_gpu"] <= v["power_cap_w"] * (1 + 1e-6)).all()
    at_lowest = v[v["power_cap_w"] == 100]
    assert (at_lowest["power_w_per_gpu"] >= 98).all() and (at_lowest["predicted_power_w_per_gpu"] >= 98).all()


def test_predicted_kernel_time_share_follows_the_measured_utilization():
    """NVML utilization (the share of the time a kernel ran) was never fitted: the physics predicts it from the
    step's split between GPU work and host waits. Measured, it rises as the cap falls (the host's time per batch
    stays, the kernels slow down): so does the prediction, for every model at batch >= 16. Counting every step's
    whole duration as busy, as a GPU model without host waits would, misses by the whole host share (~15
    points); the physics misses by a fraction of that."""
    v = predict_table(pals(), "pals", "analytic")
    miss_points = (v["predicted_gpu_busy_fraction"] - v["gpu_busy_fraction"]).abs() * 100
    naive_points = (1.0 - v["gpu_busy_fraction"]) * 100
    print(f"\nPALS A100 utilization, mean miss: physics {miss_points.mean():.1f} points, "
          f"all-busy {naive_points.mean():.1f} points")
    assert miss_points.mean() < naive_points.mean() / 3
    big = v[v["max_num_seqs"] >= 16]
    for (model, batch), g in big.groupby(["model", "max_num_seqs"]):
        at = g.set_index("power_cap_w")
        assert at.loc[100, "gpu_busy_fraction"] > at.loc[400, "gpu_busy_fraction"], (model, batch)
        assert at.loc[100, "predicted_gpu_busy_fraction"] > at.loc[400, "predicted_gpu_busy_fraction"], (model, batch)


# ----- calibration ------------------------------------------------------------------------------------
def test_catalog_reads_the_committed_calibration():
    params = gpu_params("a100-sxm4-80gb")
    assert params, "traces/calibration/a100-sxm4-80gb.json is missing"
    for name, value in params.items():
        assert getattr(GPUS["a100-sxm4-80gb"], name) == pytest.approx(value)
        assert getattr(GPUS["a100-sxm4-40gb"], name) == pytest.approx(value)  # same die
    assert GPUS["a100-sxm4-40gb"].hbm_bytes != GPUS["a100-sxm4-80gb"].hbm_bytes  # datasheet figures kept
    # Every fitted engine parameter written to the file is one the simulator reads back.
    fitted = {p.name for p in PARAMS if p.part == "engine"}
    with open(CALIBRATION_DIR / "a100-sxm4-80gb.json") as f:
        assert set(json.load(f)["engine"]) == fitted
    assert set(engine_params("a100-sxm4-80gb")) == fitted
    # The committed files hold the fitted GPU parameters and nothing else: the collective latency, which no fit
    # places, stays at the catalog's measured figure.
    fitted_gpu = {p.name for p in PARAMS if p.part == "gpu"}
    for doc in CALIBRATION_DIR.glob("*.json"):
        assert set(json.loads(doc.read_text())["gpu_params"]) == fitted_gpu, doc.name
    assert "collective_latency_s" not in fitted_gpu
    assert GPUS["h100-sxm"].collective_latency_s == pytest.approx(8e-6)


def test_fit_recovers_known_parameters_from_synthetic_data():
    # Rows generated by the physics with known parameters: the fit must find parameters predicting them.
    truth_gpu = with_params(datasheet_gpu("a100-sxm4-80gb"), datasheet_gpu("a100-sxm4-80gb"))
    truth_engine = EngineOverheads(step_s=0.003, per_request_s=5e-4, layer_latency_s=2e-5, expert_latency_s=5e-6)
    rows = pals()[pals()["max_num_seqs"].isin([1, 8, 64])].copy()
    preds = [analytic_row(r, row_physics(r, truth_gpu, truth_engine)) for r in rows.itertuples(index=False)]
    rows["throughput_tokens_per_s"] = [p.throughput_tokens_per_s for p in preds]
    rows["power_w_per_gpu"] = [p.power_w_per_gpu for p in preds]
    result = fit(rows, "a100-sxm4-80gb", max_evals=200)
    assert result.mape["throughput_tokens_per_s"] < 1.0
    assert result.mape["power_w_per_gpu"] < 1.0


# Known parameters away from the first estimates the fit starts from.
TRUTH_GPU = replace(datasheet_gpu("a100-sxm4-80gb"), compute_efficiency=0.5, memory_efficiency=0.7,
                    active_base_power_w=30.0, compute_power_w=270.0, memory_power_w=70.0, kv_power_w=40.0,
                    voltage_floor=0.7, voltage_knee=0.65)
TRUTH_ENGINE = EngineOverheads(step_s=0.001, layer_latency_s=1e-5, expert_latency_s=8e-6, moe_tile_tokens=48.0,
                               expert_bandwidth_fraction=0.8, expert_gemm_half_dim=250.0, expert_compute_fraction=0.9)


def synthetic_rows(noise: float = 0.0) -> pd.DataFrame:
    """PALS's design (4 models, every cap, batches 1/8/64) measured on the physics itself with the known
    parameters, with log-normal noise of this spread on throughput and power (seeded: the same draws, scaled)."""
    rows = pals()[pals()["max_num_seqs"].isin([1, 8, 64])].reset_index(drop=True)
    preds = [analytic_row(r, row_physics(r, TRUTH_GPU, TRUTH_ENGINE)) for r in rows.itertuples(index=False)]
    draws = np.random.default_rng(7).standard_normal((2, len(rows)))
    rows["throughput_tokens_per_s"] = [p.throughput_tokens_per_s for p in preds] * np.exp(noise * draws[0])
    rows["power_w_per_gpu"] = [p.power_w_per_gpu for p in preds] * np.exp(noise * draws[1])
    return rows


@cache
def noisy_fits() -> tuple[FitResult, FitResult]:
    """Fits to the synthetic rows with 3 % and 6 % noise."""
    return tuple(fit(synthetic_rows(noise), "a100-sxm4-80gb", max_evals=200) for noise in (0.03, 0.06))


WELL_DETERMINED = ("compute_efficiency", "idle_power_w", "compute_power_w", "voltage_floor")


def test_standard_errors_cover_the_truth_on_noisy_synthetic_data():
    # The Gauss-Newton standard error is a 1-sigma estimate: the known parameters lie within a few of them.
    result, _ = noisy_fits()
    for name in WELL_DETERMINED:
        value, truth = getattr(result.gpu, name), getattr(TRUTH_GPU, name)
        assert math.isfinite(result.std[name]) and result.std[name] > 0, name
        assert abs(value - truth) <= 4 * result.std[name], (name, value, truth, result.std[name])


def test_standard_errors_grow_with_the_noise():
    # The model fits noiseless rows exactly, so the residuals are the noise: doubling it doubles the residual
    # spread and so (the Jacobian barely moving) every standard error.
    low, high = noisy_fits()
    for name in WELL_DETERMINED:
        assert 1.6 <= high.std[name] / low.std[name] <= 2.5, (name, low.std[name], high.std[name])


def test_held_out_checks_on_data_from_the_physics_itself():
    # Where the data follow the physics, the fit machinery meets the held-out targets; what it misses on
    # real data is the physics, not the fitting. The small-expert models share their experts' shape with the
    # models left in, so each is predicted almost exactly; Mixtral's large experts are where three small-expert
    # models pin the parameters least.
    rows = synthetic_rows()
    folds = {f.held_out[0]: f.mape for f in held_out_errors(rows, "a100-sxm4-80gb", "model")}
    assert set(folds) == set(rows["model"])
    for model, figures in folds.items():
        assert figures["throughput_tokens_per_s"] <= 10.0 and figures["power_w_per_gpu"] <= 6.0, (model, figures)
        if model != "mixtral-8x7b":
            assert figures["throughput_tokens_per_s"] <= 1.0 and figures["power_w_per_gpu"] <= 1.0, (model, figures)
    (caps,) = held_out_errors(rows, "a100-sxm4-80gb", "power_cap_w", list(TRAIN_CAPS))
    assert caps.held_out == (100.0, 200.0, 300.0, 350.0) and caps.train_rows == 36 and caps.test_rows == 48
    assert caps.mape["throughput_tokens_per_s"] <= 5.0 and caps.mape["power_w_per_gpu"] <= 4.0


def test_pooled_mape_weights_each_fold_by_the_rows_that_measured_the_metric():
    # Two folds: 3 rows at 10 % and 1 row at 2 % on throughput is 8 % over the 4 rows, not the folds' mean 6 %;
    # ITL measured on 2 rows of the first fold only and 2 of the second; power missing from the second fold.
    folds = [HeldOut(("a",), 5, 3, {"throughput_tokens_per_s": 10.0, "power_w_per_gpu": 4.0, "itl_median_s": 6.0},
                     {"throughput_tokens_per_s": 3, "power_w_per_gpu": 3, "itl_median_s": 2}),
             HeldOut(("b",), 7, 2, {"throughput_tokens_per_s": 2.0, "itl_median_s": 12.0},
                     {"throughput_tokens_per_s": 1, "itl_median_s": 2})]
    assert pooled_mape(folds) == {"throughput_tokens_per_s": pytest.approx(8.0), "power_w_per_gpu": 4.0,
                                  "itl_median_s": pytest.approx(9.0)}
    # A fold without counts weighs by its held-out rows.
    assert pooled_mape([HeldOut(("a",), 5, 3, {"power_w_per_gpu": 4.0}),
                        HeldOut(("b",), 5, 1, {"power_w_per_gpu": 8.0})]) == {"power_w_per_gpu": pytest.approx(5.0)}
    assert pooled_mape([]) == {}


def test_holdout_cli_prints_and_writes_its_folds_and_rejects_bad_options(tmp_path):
    table = tmp_path / "t.csv"
    write_table(pals()[pals()["max_num_seqs"].isin([1, 64])], table)
    cli = [sys.executable, "-m", "sim.cli", "holdout", str(table)]
    out = subprocess.run([*cli, "--by", "power_cap_w", "--train", "150,400", "--out", str(tmp_path / "h"),
                          "--measured", "idle_power_w=60"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "throughput MAPE" in out.stdout
    doc = json.loads((tmp_path / "h" / "holdout.json").read_text())
    assert doc["measured"] == {"idle_power_w": 60.0}
    (fold,) = doc["gpus"]["a100-sxm4-80gb"]["folds"]
    assert fold["held_out"] == [100.0, 200.0, 250.0, 300.0, 350.0]
    assert fold["train_rows"] == 16 and fold["test_rows"] == 40
    assert fold["rows_measured"] == {"throughput_tokens_per_s": 40, "power_w_per_gpu": 40}  # PALS has no ITL
    assert set(fold["mape_percent"]) == {"throughput_tokens_per_s", "power_w_per_gpu"}
    assert doc["gpus"]["a100-sxm4-80gb"]["all_folds_mape_percent"] == fold["mape_percent"]  # one fold: the same
    assert "all folds" not in out.stdout
    # Each batch left out in turn: a line per fold, then every held-out row together, weighted by the rows that
    # measured each metric (here 28 a fold: 4 models x 7 caps).
    out = subprocess.run([*cli, "--by", "max_num_seqs", "--out", str(tmp_path / "b")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b" / "holdout.json").read_text())["gpus"]["a100-sxm4-80gb"]
    assert [f["held_out"] for f in report["folds"]] == [[1.0], [64.0]]
    for metric in ("throughput_tokens_per_s", "power_w_per_gpu"):
        folds = report["folds"]
        assert [f["rows_measured"][metric] for f in folds] == [28, 28]
        assert report["all_folds_mape_percent"][metric] == pytest.approx(
            (folds[0]["mape_percent"][metric] + folds[1]["mape_percent"][metric]) / 2)
    assert "all folds" in out.stdout
    for bad, message in ((["--by", "cap"], "--by 'cap': expected one of model, power_cap_w"),
                         (["--by", "power_cap_w", "--train", "150,999"], "--train [999.0]: no rows with power_cap_w"),
                         (["--measured", "idle_power_w=0"], "idle_power_w=0 for a100-sxm4-80gb: expected the measured "
                                                            "idle draw in watts, above 0 and below its lowest power "
                                                            "limit (100 W)"),
                         (["--measured", "60"], "--measured '60': expected NAME=VALUE with a number"),
                         (["--measured", "idle_power_w=60", "--measured", "idle_power_w=61"],
                          "--measured 'idle_power_w=61': idle_power_w is given twice"),
                         (["--measured", "idle=60"], "measured parameter 'idle': not a fitted one (expected one of "
                                                     "compute_efficiency, ")):
        out = subprocess.run([*cli, *bad], capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_calibrate_cli_writes_where_told_with_its_provenance(tmp_path):
    table = tmp_path / "pals.csv"
    write_table(pals()[pals()["model"] == "mixtral-8x7b"], table)
    out = subprocess.run([sys.executable, "-m", "sim.cli", "calibrate", str(table), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "a100-sxm4-80gb.json").read_text())
    assert doc["fitted_on"]["rows"] == 42 and doc["fitted_on"]["models"] == ["mixtral-8x7b"]
    assert set(doc["gpu_params"]) == {p.name for p in PARAMS if p.part == "gpu"}
    errors = doc["fit"]["standard_error"]
    assert set(errors) == {p.name for p in PARAMS}
    assert errors["voltage_floor"] > 0  # Mixtral alone, yet capped rows: the voltage curve is fitted, with an error
    for p in PARAMS:
        value = doc["gpu_params" if p.part == "gpu" else "engine"][p.name]
        low, high = p.bounds(datasheet_gpu("a100-sxm4-80gb"))
        assert low - 1e-9 <= value <= high + 1e-9


def test_validate_cli_writes_its_three_files_and_rejects_unknown_models(tmp_path):
    table = tmp_path / "t.csv"
    write_table(pals().iloc[::12], table)
    out = subprocess.run([sys.executable, "-m", "sim.cli", "validate", str(table), "--out", str(tmp_path / "v")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert summary["overall"]["rows"] == 14
    assert {"by_model", "by_gpu", "by_source"} <= set(summary)
    v = pd.read_csv(tmp_path / "v" / "validation.csv")
    assert len(v) == 14
    # The GPU busy share (NVML utilization) is compared where measured: PALS recorded it, ITL it did not.
    assert summary["overall"]["rows_measured"] == {"throughput_tokens_per_s": 14, "power_w_per_gpu": 14,
                                                   "gpu_busy_fraction": 14}
    err = (v["predicted_gpu_busy_fraction"] / v["gpu_busy_fraction"] - 1).abs().mean() * 100
    assert summary["overall"]["gpu_busy_fraction"] == pytest.approx(err, abs=0.01)
    assert "busy" in out.stdout and "ITL" not in out.stdout  # a column per metric the table measured
    page = (tmp_path / "v" / "validation.html").read_text()
    assert "plotly" in page
    for label in ("measured (output tokens\\u002fs)", "predicted (W per GPU)", "power cap (W)", "error (%)",
                  "max_num_seqs (batch knob)"):
        assert label in page  # every axis says what it is and in what unit (plotly escapes "/" in its JSON)
    bad = pals().head(2).copy()
    bad.loc[1, "model"] = "gpt-5"
    write_table(bad, table)
    out = subprocess.run([sys.executable, "-m", "sim.cli", "validate", str(table), "--out", str(tmp_path / "w")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "line 3, field 'model': 'gpt-5' is not in the catalog" in out.stderr
    assert "Traceback" not in out.stderr


def test_validate_reports_each_model_on_each_gpu_when_the_table_spans_gpus(tmp_path):
    t = mlenergy()
    rows = t[t["model"].isin(["llama-3.1-8b", "llama-3.1-70b"])].groupby(["model", "gpu"]).head(1)
    assert set(rows["gpu"]) == {"h100-sxm", "b200"}
    table = tmp_path / "t.csv"
    write_table(rows.reset_index(drop=True), table)
    out = subprocess.run([sys.executable, "-m", "sim.cli", "validate", str(table), "--out", str(tmp_path / "v"),
                          "--analytic"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "v" / "validation.json").read_text())
    pairs = {f"{m} on {g}" for m, g in zip(rows["model"], rows["gpu"], strict=True)}
    assert set(summary["by_model_gpu"]) == pairs and len(pairs) == 4
    v = pd.read_csv(tmp_path / "v" / "validation.csv")
    for name, block in summary["by_model_gpu"].items():  # each block is its own row's error
        model, gpu = name.split(" on ")
        err = v[(v["model"] == model) & (v["gpu"] == gpu)]["error_power_w_per_gpu_pct"].abs()
        assert block["rows"] == len(err) == 1
        assert block["power_w_per_gpu"] == pytest.approx(float(err.iloc[0]), abs=0.01)
    for name in [*pairs, "h100-sxm", "b200"]:  # whole names on an 80-column terminal, one line each
        assert name in out.stdout


# ----- accuracy on data the fit never saw ------------------------------------------------------------
TRAIN_CAPS = (150, 250, 400)


# The closed form the fit uses predicts the held-out rows (it equals the simulator within 0.1 % on static batches
# and a few % on saturated ones: see the agreement test).
@cache
def leave_caps_out() -> dict[str, float]:
    (fold,) = held_out_errors(pals(), "a100-sxm4-80gb", "power_cap_w", list(TRAIN_CAPS))
    print(f"\nPALS A100 leave-caps-out (fit 150/250/400 W, predict 100/200/300/350 W): {fold.mape}")
    return fold.mape


def test_leave_caps_out_power():
    assert leave_caps_out()["power_w_per_gpu"] <= 4.0


@pytest.mark.xfail(reason="target 5 % not reached: the held-out 200-350 W rows are within 3-4.5 %, but at 100 W, "
                          "below every fitted cap, the small-expert models' throughput is over-predicted by 17-29 % "
                          "(NVML utilization shows their kernels slowing more from 150 to 100 W than the physics has; "
                          "fitted on 150/250/400 W it predicts OLMoE's and Qwen-MoE's utilization 4-10 points low "
                          "at batch >= 16: host time stands in for kernel time, and does not slow with the clock; "
                          "6.2 % with the idle draw held at a measured 60 W, below)",
                   strict=False)
def test_leave_caps_out_throughput():
    assert leave_caps_out()["throughput_tokens_per_s"] <= 5.0


@cache
def leave_one_model_out() -> dict[str, dict[str, float]]:
    folds = {f.held_out[0]: f.mape for f in held_out_errors(pals(), "a100-sxm4-80gb", "model")}
    for model, figures in folds.items():
        print(f"\nPALS A100 leave-one-model-out, {model}: {figures}")
    return folds


@pytest.mark.parametrize("model", ["deepseek-moe-16b", "mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"])
def test_leave_one_model_out(model):
    figures = leave_one_model_out()[model]
    assert figures["throughput_tokens_per_s"] <= 10.0 and figures["power_w_per_gpu"] <= 6.0


def test_mixtral_held_out_does_not_hinge_on_the_csv_rounding(tmp_path):
    # The same table read back from its CSV (six significant digits) once led the Mixtral-held-out fit into a
    # minimum 4 % costlier (10.2 % held-out error against 9.3 %); the fused-MoE tile restarts find the same one.
    path = tmp_path / "pals.csv"
    write_table(pals(), path)
    rows = read_table(path)
    result = fit(rows[rows["model"] != "mixtral-8x7b"], "a100-sxm4-80gb")
    held = rows[rows["model"] == "mixtral-8x7b"]
    figures = mape(predict_rows(held, result.gpu, result.engine), held)
    assert figures["throughput_tokens_per_s"] <= 10.0 and figures["power_w_per_gpu"] <= 6.0
    assert figures["throughput_tokens_per_s"] == pytest.approx(
        leave_one_model_out()["mixtral-8x7b"]["throughput_tokens_per_s"], abs=0.2)


def test_mlenergy_leave_one_model_out():
    worst: dict[str, float] = {}
    folds = held_out_errors(mlenergy_h100(), "h100-sxm", "model")
    for fold in folds:
        print(f"\nML.ENERGY H100 leave-one-model-out, {fold.held_out[0]}: {fold.mape}")
        for k, v in fold.mape.items():
            worst[k] = max(worst.get(k, 0.0), v)
    pooled = pooled_mape(folds)
    print(f"worst: {worst}\nall {sum(f.test_rows for f in folds)} H100 rows, each held out with its model: {pooled}")
    # Each held-out model predicted from its config alone: the targets (12 / 12 / 15 %) hold for every figure but
    # the miss the README lists (Llama-3.1-8B's power, ~17 %), which stays within the bound guarded here (and which
    # no physics shared by the two 8B models can close: see the test after next).
    misses = {("llama-3.1-8b", "power_w_per_gpu")}
    targets = {"throughput_tokens_per_s": 12.0, "power_w_per_gpu": 12.0, "itl_median_s": 15.0}
    for fold in folds:
        for metric, target in targets.items():
            if (fold.held_out[0], metric) not in misses:
                assert fold.mape[metric] <= target, (fold.held_out[0], metric, fold.mape[metric])
    for metric, target in targets.items():  # over all the H100 rows, each predicted without its model: every one
        assert pooled[metric] <= target, (metric, pooled[metric])
    assert worst["power_w_per_gpu"] <= 20.0


# The dense GEMM efficiency of an H100 SXM as a microbenchmark measures it: cuBLAS's FP16 tensor-core GEMM at
# 8192^3 reaches 762 TFLOPS, 0.77 of the datasheet's 989 (a public run on one idle H100 SXM5; FlashAttention-3
# reports 740 for its kernel, 0.75).
H100_GEMM_EFFICIENCY = 0.77


def test_llama_70b_held_out_with_a_measured_gemm_efficiency_meets_the_targets():
    # The committed H100 fit holds the GEMM efficiency at the measured figure (fitted on every H100 row it drifts
    # to ~0.9, above what any GEMM reaches); held there without Llama-3.1-70B, the 70B is still predicted from
    # its config within the targets (~8 / 4 / 6 %; ~6 / 5 / 6 % with the efficiency fitted, ~0.79).
    t = mlenergy_h100()
    others = sorted(set(t["model"]) - {"llama-3.1-70b"})
    (fold,) = held_out_errors(t, "h100-sxm", "model", others, measured={"compute_efficiency": H100_GEMM_EFFICIENCY})
    print(f"\nML.ENERGY H100, Llama-3.1-70B held out, GEMM efficiency held at {H100_GEMM_EFFICIENCY}: {fold.mape}")
    assert fold.held_out == ("llama-3.1-70b",)
    assert fold.mape["throughput_tokens_per_s"] <= 12.0
    assert fold.mape["power_w_per_gpu"] <= 12.0
    assert fold.mape["itl_median_s"] <= 15.0


def test_llama_3_1_8b_h100_power_is_out_of_reach_of_a_shared_physics():
    # Why Llama-3.1-8B's held-out power is a tolerated miss. At batch 8 both one-GPU models decode bound by HBM.
    # Qwen3-8B's step streams more bytes (2 % more weights, 36 layers of KV against 32, longer outputs) and takes
    # 12 % longer, yet costs less energy (mean power x median ITL) than Llama-3.1-8B's. A step's energy is its
    # static power over its duration plus what its bytes and FLOPs cost, none below zero, so on one GPU in one state
    # it would cost more. The one thing Llama-3.1-8B's rows carry more of is prefills (its outputs are shorter, so
    # more requests start per step); for them to close the gap, the prompts would have to average over 600 tokens,
    # over twice what the rows assume (300), even with every prompt token's FLOPs run at half the datasheet rate while
    # drawing the 700 W limit, and the static draw at 60 W, below any idle H100 SXM. Different clocks, boards,
    # temperatures or engine builds between the two runs would explain it; no model config can tell those apart.
    t = mlenergy_h100()
    batch = 8
    rows = {name: t[(t["model"] == name) & (t["max_num_seqs"] == batch)].iloc[0]
            for name in ("llama-3.1-8b", "qwen3-8b")}
    llama, qwen = rows["llama-3.1-8b"], rows["qwen3-8b"]
    specs = {name: load_model(name) for name in rows}
    step_bytes = {name: specs[name].total_weight_bytes
                  + batch * (r.prompt_tokens_mean + r.output_tokens_mean / 2) * specs[name].kv_bytes_per_token
                  for name, r in rows.items()}
    e_llama, e_qwen = (r.power_w_per_gpu * r.itl_median_s for r in (llama, qwen))
    print(f"\nbatch {batch}: Llama-3.1-8B {llama.itl_median_s * 1e3:.2f} ms, {e_llama:.3f} J, "
          f"{step_bytes['llama-3.1-8b'] / 1e9:.1f} GB a step; "
          f"Qwen3-8B {qwen.itl_median_s * 1e3:.2f} ms, {e_qwen:.3f} J, {step_bytes['qwen3-8b'] / 1e9:.1f} GB")
    assert qwen.itl_median_s > 1.1 * llama.itl_median_s and step_bytes["qwen3-8b"] > step_bytes["llama-3.1-8b"]
    assert e_qwen < e_llama
    gap_j = e_llama - e_qwen + 60.0 * (qwen.itl_median_s - llama.itl_median_s)
    more_prefills_per_step = batch / llama.output_tokens_mean - batch / qwen.output_tokens_mean
    h100 = datasheet_gpu("h100-sxm")
    prompt_token_s = 2.0 * specs["llama-3.1-8b"].dense_params / (0.5 * h100.peak_bf16_flops)
    prompt_token_j = prompt_token_s * h100.power_limit_max_w
    prompt_tokens_to_close = gap_j / more_prefills_per_step / prompt_token_j
    print(f"prompts would have to average {prompt_tokens_to_close:.0f} tokens to close the gap")
    assert prompt_tokens_to_close > 600.0


def test_argonne_a100_power_vs_batch():
    a = argonne()
    rows = a[a["gpu"] == "a100-sxm4-40gb"]
    v = predict_table(rows.reset_index(drop=True), "argonne", "simulate")
    err = float(v["error_power_w_per_gpu_pct"].abs().mean())
    print(f"\nArgonne A100 power MAPE: {err:.1f} %")
    assert err <= 10.0


def test_argonne_h100_power_vs_batch():
    a = argonne()
    v = predict_table(a[a["gpu"] == "h100-sxm"].reset_index(drop=True), "argonne", "simulate")
    err = float(v["error_power_w_per_gpu_pct"].abs().mean())
    print(f"\nArgonne H100 power MAPE: {err:.1f} %")
    assert err <= 10.0


# ----- shapes the measurements show ------------------------------------------------------------------
def _predicted(model: str, batch: int) -> pd.DataFrame:
    t = pals()
    rows = t[(t["model"] == model) & (t["max_num_seqs"] == batch)].reset_index(drop=True)
    return predict_table(rows, "pals", "analytic")


@pytest.mark.parametrize("model", ["deepseek-moe-16b", "mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"])
@pytest.mark.parametrize("batch", [16, 32, 64])
def test_tokens_per_joule_peaks_between_150_and_250_w(model, batch):
    v = _predicted(model, batch)
    per_j = v["predicted_throughput_tokens_per_s"] / v["predicted_power_w_per_gpu"]
    assert 150 <= v.loc[per_j.idxmax(), "power_cap_w"] <= 250


def test_small_expert_models_gain_less_above_250_w_than_mixtral():
    def gain(model: str, source: str) -> float:
        v = _predicted(model, 64)
        col = "throughput_tokens_per_s" if source == "measured" else "predicted_throughput_tokens_per_s"
        by_cap = v.set_index("power_cap_w")[col]
        return by_cap[400] / by_cap[250] - 1.0

    for source in ("measured", "predicted"):
        mixtral = gain("mixtral-8x7b", source)
        for small in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b"):
            assert gain(small, source) < mixtral, (source, small)


@pytest.mark.parametrize(("gpu", "batch"), [("a100-sxm4-40gb", 16), ("h100-sxm", 64)])
def test_a_multi_head_kv_cache_costs_power_as_measured(gpu, batch):
    # Argonne, 1,024 + 1,024 tokens: Llama-2-7B's multi-head cache is 4x Llama-3-8B's grouped one, and it draws
    # more power though it streams fewer weights (H100, batch 64: 595 against 455 W). Reading KV costs more energy
    # per byte than streaming weights; with one energy per byte for both, the H100 order came out reversed.
    # On the 40 GB A100, Llama-2-7B's cache past batch 16 (64 x 2,048 tokens x 512 KiB = 64 GiB at batch 64)
    # overflows the memory: vLLM then runs fewer sequences at once and recomputes preempted ones, which the
    # physics does not model, so the comparison is made at the largest batch that fits.
    a = argonne()
    rows = a[(a["gpu"] == gpu) & (a["max_num_seqs"] == batch)].reset_index(drop=True)
    v = predict_table(rows, "argonne", "analytic").set_index("model")
    for col in ("power_w_per_gpu", "predicted_power_w_per_gpu"):
        assert v.loc["llama-2-7b", col] > v.loc["llama-3-8b", col], col


def test_a_row_the_model_cannot_take_is_named_by_file_and_line():
    # Llama-3.1-8B's 32 attention heads do not split over 3 GPUs.
    table = normalise(_row(num_gpus=3, tensor_parallel=3), "t.csv")
    with pytest.raises(PalsError, match=r"t.csv, line 2: llama-3.1-8b on 3xh100-sxm \(tensor_parallel 3\): .*"
                                        r"not divisible by tensor=3"):
        predict_table(table, "t.csv")


def test_a_tiny_or_dense_table_is_refused_or_holds_what_it_cannot_place():
    one = normalise(_row(), "t.csv")
    with pytest.raises(CalibrationError, match=r"1 row\(s\) of h100-sxm give 3 measurements, fewer than the"):
        fit(one, "h100-sxm")
    # Twenty dense single-GPU rows at the default limit: the voltage curve, host-wait share and fused-MoE kernels
    # cannot be placed, and say so (the collective latency is never fitted).
    rows = pd.concat([_row(max_num_seqs=b, throughput_tokens_per_s=100.0 * b ** 0.8, power_w_per_gpu=300 + 2 * b,
                           itl_median_s=0.008 + 1e-4 * b, itl_p99_s=0.05, running_seqs_mean=b)
                      for b in range(1, 21)], ignore_index=True)
    result = fit(normalise(rows, "t.csv"), "h100-sxm", max_evals=30)
    assert set(result.held) == {"voltage_floor", "voltage_knee", "host_power_share", "moe_tile_tokens",
                                "expert_bandwidth_fraction", "expert_latency_s", "expert_gemm_half_dim",
                                "expert_compute_fraction", "default_moe_config_slowdown"}
    assert result.engine.default_moe_config_slowdown == EngineOverheads().default_moe_config_slowdown


def test_the_default_fused_moe_config_slowdown_is_fitted_only_on_rows_that_run_it():
    # On the H100 rows only Qwen3-235B-A22B (16 whole experts per GPU) runs vLLM's default fused-MoE config; held
    # out, the fit cannot place the slowdown and keeps the kernel benchmark's 1.26 for its prediction.
    t = mlenergy_h100()
    assert any_row_runs_default_moe_config(t)
    assert not any_row_runs_default_moe_config(t[t["model"] != "qwen3-235b-a22b"])
    a100 = pals()
    assert any_row_runs_default_moe_config(a100)
    assert not any_row_runs_default_moe_config(a100[a100["model"] == "mixtral-8x7b"])
    # A short fit on the 235B's rows frees it; on the 30B's (tuned layouts) it is held at 1.26, so that is what a
    # prediction of the 235B from the other models uses.
    short = {"max_evals": 3}
    assert "default_moe_config_slowdown" not in fit(t[t["model"] == "qwen3-235b-a22b"], "h100-sxm", **short).held
    held = fit(t[t["model"] == "qwen3-30b-a3b"], "h100-sxm", **short)
    assert "default_moe_config_slowdown" in held.held
    assert held.engine.default_moe_config_slowdown == EngineOverheads().default_moe_config_slowdown == 1.26


def test_measured_parameters_are_held_exactly_and_reported_as_measured(tmp_path):
    rows = normalise(pd.concat([_row(max_num_seqs=b, throughput_tokens_per_s=100.0 * b ** 0.8,
                                     power_w_per_gpu=300 + 2 * b, running_seqs_mean=b)
                                for b in range(1, 21)], ignore_index=True), "t.csv")
    # 40.5 W lies below the range the fit may move the datasheet's 70 W in (0.85-1.2x: 59.5-84 W): kept all the same.
    measured = {"idle_power_w": 40.5, "compute_efficiency": 0.77, "step_s": 0.0021}
    result = fit(rows, "h100-sxm", max_evals=30, measured=measured)
    assert result.measured == measured
    assert (result.gpu.idle_power_w, result.gpu.compute_efficiency, result.engine.step_s) == (40.5, 0.77, 0.0021)
    for name in measured:
        assert name not in result.held and math.isnan(result.std[name])
        assert all(name not in pair[:2] for pair in result.correlated)
    doc = json.loads(write_calibration(result, "t.csv", rows, [], tmp_path).read_text())
    assert doc["gpu_params"]["idle_power_w"] == 40.5 and doc["engine"]["step_s"] == 0.0021
    assert doc["fit"]["held_as_measured"] == measured
    for bad in (0.0, -5.0, math.nan, 200.0):  # 200 W: the H100's lowest power limit
        with pytest.raises(CalibrationError, match=r"idle_power_w=.* for h100-sxm: expected the measured idle draw"):
            fit(rows, "h100-sxm", max_evals=30, measured={"idle_power_w": bad})
    with pytest.raises(CalibrationError, match=r"compute_efficiency=1.5 for h100-sxm: expected 0.15 to 0.95"):
        fit(rows, "h100-sxm", max_evals=30, measured={"compute_efficiency": 1.5})
    # One measured draw for one GPU type: a table of two types needs --gpu.
    table = tmp_path / "two.csv"
    write_table(pd.concat([rows, normalise(_row(gpu="a100-sxm4-80gb", power_cap_w=300), "t.csv")]), table)
    for command in ("calibrate", "holdout"):
        out = subprocess.run([sys.executable, "-m", "sim.cli", command, str(table), "--measured", "idle_power_w=60"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "--measured: the tables hold rows of several GPUs (a100-sxm4-80gb, h100-sxm); name the one it " \
               "was measured on with --gpu" in out.stderr


# The idle draw of an A100-SXM4-80GB as nvidia-smi reads it (P0, no process, 0 % utilization): the median of 14
# public readings (51-70 W), independent of the PALS table.
A100_80GB_IDLE_W = 60.0


def test_leave_caps_out_with_the_measured_idle_power_predicts_100_w_better():
    # The 150-400 W rows place the idle draw loosely (the fit trades it against the active powers and lands near
    # 54 W); under a 100 W cap it decides what is left for work (~40 W), so holding it at a measured draw 6 W
    # higher must lower the clock, and the throughput, the fit predicts there. The free fit is 17-29 % fast at
    # 100 W on the small-expert models.
    (fold,) = held_out_errors(pals(), "a100-sxm4-80gb", "power_cap_w", list(TRAIN_CAPS),
                              measured={"idle_power_w": A100_80GB_IDLE_W})
    print(f"\nPALS A100 leave-caps-out, idle power held at {A100_80GB_IDLE_W:g} W: {fold.mape}")
    free = leave_caps_out()
    assert fold.mape["throughput_tokens_per_s"] <= free["throughput_tokens_per_s"] - 0.5
    assert fold.mape["power_w_per_gpu"] <= 4.0


def test_optional_cells_left_empty_take_their_defaults_and_caps_must_fit_the_gpu(tmp_path):
    path = tmp_path / "t.csv"
    _row(output_tokens_cv="", power_idle_tail_s="").to_csv(path, index=False)
    back = read_table(path)
    assert back["output_tokens_cv"].iloc[0] == 0.0 and back["power_idle_tail_s"].iloc[0] == 0.0
    with pytest.raises(ProfileError, match=r"t.csv, line 2, field 'power_cap_w': 100 W is outside h100-sxm's "
                                           r"power-limit range 200-700 W"):
        check_catalog(normalise(_row(power_cap_w=100), "t.csv"), "t.csv")


def test_an_own_calibration_folder_overrides_gpu_by_gpu(tmp_path):
    # A fit of the H200 only, in a folder of one's own: the H200 uses it, every other GPU keeps the committed
    # fit, and summary.json names the file each GPU used.
    doc = json.loads((CALIBRATION_DIR / "h100-sxm.json").read_text())
    doc.update(gpu="h200", applies_to=["h200"])
    doc["gpu_params"]["compute_efficiency"] = 0.3
    mine = tmp_path / "cal"
    mine.mkdir()
    (mine / "h200.json").write_text(json.dumps(doc))
    probe = ("from sim.catalog.calibration import calibration_file, gpu_params; import json; "
             "print(json.dumps([calibration_file('h200'), calibration_file('h100-sxm'), "
             "gpu_params('h200')['compute_efficiency']]))")
    env = {**os.environ, "PALS_CALIBRATION_DIR": str(mine)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    h200, h100, eff = json.loads(out.stdout)
    assert h200 == str(mine / "h200.json") and h100 == str(CALIBRATION_DIR / "h100-sxm.json") and eff == 0.3
    env["PALS_CALIBRATION_DIR"] = str(tmp_path / "nowhere")
    out = subprocess.run([sys.executable, "-m", "sim.cli", "run", "scenarios/quickstart.yaml", "--set",
                          "duration_s=2", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                         cwd=REPO)
    assert out.returncode == 2 and "PALS_CALIBRATION_DIR" in out.stderr and "no such folder" in out.stderr
