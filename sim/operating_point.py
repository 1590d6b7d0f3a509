"""One profile-table row as something to predict: its deployment, its physics, its scenario.

Two predictors share the row's physics:

* ``simulate_row`` builds the row's scenario (static batches of ``max_num_seqs`` prompts, or enough
  closed-loop clients to keep ``max_num_seqs`` running) and runs the simulator: what ``pals validate`` reports;
* ``analytic_row`` costs the steady state in closed form (``sim.control.models.PhysicsModel``): fast enough to
  sit inside a least-squares fit (``pals calibrate``) and checked against the simulator in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from sim.catalog.calibration import engine_params
from sim.catalog.fused_moe import runs_default_moe_config
from sim.catalog.gpus import GpuSpec, get_gpu
from sim.catalog.models import ModelSpec, load_model
from sim.control.models import PhysicsModel
from sim.engine import kv_capacity_tokens
from sim.metrics import mean_utilization
from sim.physics import (
    CUDA_GRAPH_MAX_TOKENS,
    EngineOverheads,
    Parallelism,
    ReplicaPhysics,
    default_cuda_graph_max_tokens,
)
from sim.scenario import Scenario, scenario_from_dict

STATIC_BATCHES_PER_ROW = 3  # batches simulated per static-batches row (each one the same)
SATURATE_OUTPUT_LENGTHS = 8  # saturate rows: each client's requests last this many mean outputs, or more


@dataclass(frozen=True)
class RowPrediction:
    """Predicted operating point of a row."""

    throughput_tokens_per_s: float
    power_w_per_gpu: float
    itl_median_s: float
    itl_p99_s: float = math.nan
    running_seqs_mean: float = math.nan  # sequences running per replica, on average
    gpu_busy_fraction: float = math.nan  # share of the time a kernel runs on a GPU (NVML's utilization)


def parallelism(row: Any) -> tuple[Parallelism, int]:
    """A row's replica layout and replica count: experts spread over the GPUs when ``expert_parallel > 1``."""
    tp, ep, n = int(row.tensor_parallel), int(row.expert_parallel), int(row.num_gpus)
    if ep > 1:
        data = max(1, ep // tp)
        par = Parallelism(tp, data, True)
    else:
        par = Parallelism(tp, 1, False)
    return par, max(1, n // par.num_gpus)


def max_num_batched_tokens(row: Any) -> int:
    """The step token budget a row's engine ran with.

    Static batches (offline ``LLM.generate``): the whole batch's prompts are prefilled in one step (vLLM
    without chunked prefill); served runs: vLLM V1's chunked-prefill default of 8192.
    """
    if row.workload == "static-batches":
        return max(8192, math.ceil(row.max_num_seqs * row.prompt_tokens_mean))
    return max(8192, int(row.max_num_seqs))


def cuda_graph_tokens(row: Any) -> int:
    """The largest step a row's engine replayed as a CUDA graph (vLLM V1's default for its ``max_num_seqs``).

    Static batches ran through ``LLM.generate`` with the engine's default ``max_num_seqs`` (the batch is how
    many prompts each call passes), at least 256, so graphs reach 512 tokens; served runs set ``max_num_seqs``
    to the row's, and graphs reach twice that, at most 512 tokens.
    """
    if row.workload == "static-batches":
        return CUDA_GRAPH_MAX_TOKENS
    return default_cuda_graph_max_tokens(int(row.max_num_seqs))


def row_physics(row: Any, gpu: GpuSpec | None = None, overheads: EngineOverheads | None = None) -> ReplicaPhysics:
    """The physics of one replica of the row's deployment (catalog GPU and calibrated engine by default)."""
    gpu = gpu or get_gpu(row.gpu)
    if overheads is None:
        overheads = EngineOverheads(**engine_params(gpu.name))
    par, _ = parallelism(row)
    model = load_model(row.model)
    return ReplicaPhysics(model, gpu, par, overheads, cuda_graph_max_tokens=cuda_graph_tokens(row),
                          default_moe_config=row_runs_default_moe_config(row, gpu.name, model))


def row_runs_default_moe_config(row: Any, gpu_name: str, model: ModelSpec | None = None) -> bool:
    """Whether the row's deployment, on ``gpu_name``, runs vLLM's default fused-MoE config
    (``sim.catalog.fused_moe``); ``model``: the row's, if already loaded."""
    par, _ = parallelism(row)
    return runs_default_moe_config(model or load_model(row.model), gpu_name, par.tensor, par.data, par.expert)


def analytic_row(row: Any, phys: ReplicaPhysics) -> RowPrediction:
    """Closed-form steady state of a row (see ``PhysicsModel``)."""
    _, replicas = parallelism(row)
    static = row.workload == "static-batches"
    budget = max_num_batched_tokens(row)
    kv = kv_capacity_tokens(phys, 0.9, budget)
    model = PhysicsModel(phys, replicas, row.prompt_tokens_mean, row.output_tokens_mean, budget, static_batches=static,
                         kv_capacity_tokens=kv, output_tokens_cv=getattr(row, "output_tokens_cv", 0.0),
                         prompt_tokens_cv=getattr(row, "prompt_tokens_cv", 0.0))
    cap, b = row.power_cap_w, int(row.max_num_seqs)
    pred = model.predict(cap, b)
    return measured_as_row(row, phys.gpu, RowPrediction(pred.tokens_per_s, pred.power_w_per_gpu,
                                                         model.step_quantile_s(cap, b, 0.5),
                                                         model.step_quantile_s(cap, b, 0.99),
                                                         model.running_seqs(b), model.busy_fraction(cap, b)))


def measured_as_row(row: Any, gpu: GpuSpec, pred: RowPrediction) -> RowPrediction:
    """A prediction seen through the row's power measurement: where its power mean also covers
    ``power_idle_tail_s`` of idle GPUs after one batch (see ``sim.profile``), the batch's energy plus the idle
    draw over that tail, divided by both durations."""
    tail_s = float(getattr(row, "power_idle_tail_s", 0.0))
    if tail_s <= 0.0 or not pred.throughput_tokens_per_s > 0.0:
        return pred
    _, replicas = parallelism(row)
    batch_s = replicas * int(row.max_num_seqs) * row.output_tokens_mean / pred.throughput_tokens_per_s
    power_w = (pred.power_w_per_gpu * batch_s + gpu.idle_power_w * tail_s) / (batch_s + tail_s)
    busy = pred.gpu_busy_fraction * batch_s / (batch_s + tail_s)
    return replace(pred, power_w_per_gpu=power_w, gpu_busy_fraction=busy)


def _lognormal(mean: float, cv: float) -> dict[str, Any]:
    """A scenario's log-normal token-length distribution with this mean and coefficient of variation."""
    spread = 1.0 + cv * cv
    return {"dist": "lognormal", "median": mean / math.sqrt(spread), "sigma": math.sqrt(math.log(spread))}


def row_scenario(row: Any, seed: int = 0) -> Scenario:
    """The scenario whose run measures the row's operating point in the simulator."""
    par, replicas = parallelism(row)
    prompt = max(1, round(row.prompt_tokens_mean))
    output = max(1, round(row.output_tokens_mean))
    b = int(row.max_num_seqs)
    if row.workload == "static-batches":
        workload: dict[str, Any] = {"kind": "static-batches", "batch_size": b * replicas, "prompt_tokens": prompt,
                                    "output_tokens": output, "requests": STATIC_BATCHES_PER_ROW * b * replicas}
        duration = 1e6  # the run ends when the last batch has finished
    else:
        # Output lengths vary so that finishes, and so prefills, are staggered: log-normal with the row's mean
        # and coefficient of variation, or, where the row gives none, uniform on [1, 2·mean - 1].
        cv = float(getattr(row, "output_tokens_cv", 0.0))
        lengths: dict[str, Any] = {"dist": "uniform", "low": 1, "high": max(1, 2 * output - 1)}
        if cv > 0.0:
            lengths = _lognormal(row.output_tokens_mean, cv)
        prompt_cv = float(getattr(row, "prompt_tokens_cv", 0.0))
        prompts: int | dict[str, Any] = _lognormal(row.prompt_tokens_mean, prompt_cv) if prompt_cv > 0.0 else prompt
        workload = {"kind": "closed-loop", "clients": b * replicas, "prompt_tokens": prompts, "output_tokens": lengths}
        itl = analytic_row(row, row_physics(row)).itl_median_s
        duration = max(30.0, SATURATE_OUTPUT_LENGTHS * output * itl)
    data = {
        "name": f"{row.model} on {row.num_gpus}x{row.gpu} at {row.power_cap_w:g} W, max_num_seqs {b}",
        "seed": seed, "duration_s": duration,
        "deployments": [{
            "name": "row", "model": row.model, "gpu": row.gpu, "replicas": replicas,
            "parallelism": {"tensor": par.tensor, "data": par.data, "expert": par.expert},
            "engine": {"max_num_seqs": b, "max_num_batched_tokens": max_num_batched_tokens(row),
                       "cuda_graph_max_tokens": cuda_graph_tokens(row)},
            "workload": workload}],
        "power": {"cap_actuation_delay_s": 0.0},  # the cap holds from the start, as in a profiling sweep
        "control": {"policy": "static", "period_s": max(0.5, duration / 200.0), "power_cap_w": row.power_cap_w},
    }
    return scenario_from_dict(data, "profile row")


def simulate_row(row: Any, seed: int = 0) -> RowPrediction:
    """The row's operating point measured in the simulator.

    Static batches: the whole run (every batch alike), seen through the row's power window
    (``measured_as_row``). Saturated: the windows after the first quarter of the run (past the start-up burst
    of prefills). The median and 99th percentile of the inter-token latency over every token of the run
    (``sim.itl``), as a serving benchmark measures them.
    """
    from sim.run import run_scenario

    scenario = row_scenario(row, seed)
    out = run_scenario(scenario)
    itl, itl_p99 = out.summary["totals"]["itl_p50_s"], out.summary["totals"]["itl_p99_s"]
    ts = out.timeseries
    if row.workload == "static-batches":  # (its few control windows do not sample the running batch)
        t = out.summary["totals"]
        pred = RowPrediction(t["throughput_tokens_per_s"], t["avg_power_w"] / t["num_gpus"], itl, itl_p99,
                             gpu_busy_fraction=mean_utilization(ts))
        return measured_as_row(row, get_gpu(row.gpu), pred)
    steady = ts[ts["time_s"] >= 0.25 * scenario.duration_s]
    window = steady.drop_duplicates(["time_s", "replica"])
    span = float(steady.drop_duplicates("time_s")["window_s"].sum())
    tokens = float((window["throughput_tokens_per_s"] * window["window_s"]).sum())
    energy = float((steady["power_w"] * steady["window_s"]).sum())  # energy_j is the cumulative counter
    n_gpus = int(steady["gpu"].nunique())
    # Sequences running per replica, sampled at every window's end (as a Prometheus gauge is scraped).
    return RowPrediction(tokens / span, energy / span / n_gpus, itl, itl_p99, float(window["batch"].mean()),
                         mean_utilization(steady))
