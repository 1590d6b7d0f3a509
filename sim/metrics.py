"""Records to DataFrames, and the run summary.

``requests.parquet`` has one row per request; ``timeseries.parquet`` one row per control period and GPU.
The summary holds ``totals`` and ``deployments.<name>`` with throughput, energy, latency percentiles (TTFT, TPOT
and end-to-end per request; inter-token latency per token, ``sim.itl``), SLO attainment and budget adherence.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sim.catalog.calibration import calibration_file
from sim.itl import ItlPieces, percentiles
from sim.plant import RECORD_COLUMNS, TIMESERIES_COLUMNS, RunResult

REQUEST_COLUMNS = ("deployment", "request_id", "replica", "arrival_s", "first_token_s", "finish_s", "prompt_tokens",
                   "output_tokens", "generated_tokens", "preemptions", "status", "drop_reason")
BUDGET_TOLERANCE = 1e-3  # relative: a window counts as a violation when power > budget·(1 + tolerance); 0.1 % absorbs
# the resolution of measured energy counters (NVML counts mJ) over short windows, and nothing a controller does


def requests_frame(result: RunResult) -> pd.DataFrame:
    """One row per request (completed, dropped, or unfinished at the end), ordered by deployment and id."""
    cols: dict[str, list] = {k: [] for k in REQUEST_COLUMNS}
    for dep in result.deployments:
        dropped = {id(r) for r in dep.dropped}
        for r in dep.requests:
            status = "dropped" if id(r) in dropped else "completed"
            for k, v in (("deployment", dep.name), ("request_id", r.id), ("replica", r.replica),
                         ("arrival_s", r.arrival_s), ("first_token_s", r.first_token_s), ("finish_s", r.finish_s),
                         ("prompt_tokens", r.prompt_tokens), ("output_tokens", r.output_tokens),
                         ("generated_tokens", r.generated), ("preemptions", r.preemptions), ("status", status),
                         ("drop_reason", r.drop_reason)):
                cols[k].append(v)
    df = pd.DataFrame(cols)
    return df.astype({"request_id": "int64", "replica": "int64", "prompt_tokens": "int64", "output_tokens": "int64",
                      "generated_tokens": "int64", "preemptions": "int64", "arrival_s": "float64",
                      "first_token_s": "float64", "finish_s": "float64"})


def timeseries_frame(result: RunResult) -> pd.DataFrame:
    """One row per control period and GPU (the ranks of a replica share power, clock, batch and throughput)."""
    ts = result.timeseries
    rec = {name: ts.column(name) for name in RECORD_COLUMNS}
    reps = np.asarray(rec["num_gpus"], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in TIMESERIES_COLUMNS:
        if name == "gpu":
            first = np.repeat(np.asarray(rec["first_gpu"], dtype=np.int64), reps)
            starts = np.repeat(np.cumsum(reps) - reps, reps)
            out[name] = first + (np.arange(int(reps.sum())) - starts)
        elif name == "power_cap_w":
            out[name] = np.asarray([c for caps in rec["power_cap_w"] for c in caps], dtype=float)
        else:
            out[name] = np.repeat(np.asarray(rec[name]), reps)
    return pd.DataFrame(out)


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else math.nan


def _latency(done: pd.DataFrame) -> dict[str, float]:
    ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy()
    multi = done[done["generated_tokens"] > 1]
    tpot = ((multi["finish_s"] - multi["first_token_s"]) / (multi["generated_tokens"] - 1)).to_numpy()
    e2e = (done["finish_s"] - done["arrival_s"]).to_numpy()
    return {"ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "tpot_p50_s": _pct(tpot, 50),
            "tpot_p99_s": _pct(tpot, 99), "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99)}


def _slo_met(done: pd.DataFrame, ttft_s: float | None, tpot_s: float | None) -> int:
    ok = np.ones(len(done), dtype=bool)
    if ttft_s is not None:
        ok &= (done["first_token_s"] - done["arrival_s"]).to_numpy() <= ttft_s
    if tpot_s is not None:
        gen = done["generated_tokens"].to_numpy()
        tpot = np.where(gen > 1, (done["finish_s"] - done["first_token_s"]).to_numpy() / np.maximum(gen - 1, 1), 0.0)
        ok &= tpot <= tpot_s
    return int(ok.sum())


def _violations(power: np.ndarray, budget: np.ndarray) -> float:
    bound = np.isfinite(budget)
    if not bound.any():
        return 0.0
    return float(np.mean(power[bound] > budget[bound] * (1 + BUDGET_TOLERANCE)))


def _tracking_error(power: np.ndarray, budget: np.ndarray) -> float:
    """Mean |power - budget| (W) over the windows with a budget in force (nan: no budget)."""
    bound = np.isfinite(budget)
    return float(np.mean(np.abs(power[bound] - budget[bound]))) if bound.any() else math.nan


def _qos(throughput: np.ndarray, target: np.ndarray) -> float:
    """Share of control windows with throughput below the target (nan: no target)."""
    has = np.isfinite(target)
    return float(np.mean(throughput[has] < target[has])) if has.any() else math.nan


def _mean_defined(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _system_energy_j(gpu_power_w: np.ndarray, window_s: np.ndarray, num_gpus: int, power: Any) -> float:
    """Node-level energy: factor x GPU power + overhead per node (PALS: 1.05 x sum + 340-350 W per node)."""
    nodes = math.ceil(num_gpus / power.gpus_per_node)
    return float(np.sum((power.node_power_factor * gpu_power_w + power.node_overhead_w * nodes) * window_s))


def mean_utilization(timeseries: pd.DataFrame) -> float:
    """Mean GPU utilization (share of the time a kernel ran) over these GPU-windows, weighted by window length
    (NaN over no time)."""
    w = timeseries["window_s"].to_numpy(dtype=float)
    total = float(w.sum())
    return float((timeseries["utilization"].to_numpy(dtype=float) * w).sum() / total) if total > 0 else math.nan


def summarize(result: RunResult, requests: pd.DataFrame, timeseries: pd.DataFrame) -> dict[str, Any]:
    """The run summary (``summary.json``)."""
    end = result.end_s
    deployments: dict[str, Any] = {}
    tot_energy = tot_tokens = tot_system_j = 0.0
    power_cfg = result.scenario.power
    tot_completed = tot_dropped = tot_slo = 0
    total_gpus = sum(len(d.gpus) for d in result.deployments)
    itl_all: list[ItlPieces] = []
    for dep in result.deployments:
        reqs = requests[requests["deployment"] == dep.name]
        done = reqs[reqs["status"] == "completed"]
        energy = float(sum(g.get_total_energy_j() for g in dep.gpus))
        tokens = float(sum(e.tokens_generated_now() for e in dep.engines))
        slo = _slo_met(done, dep.cfg.slo.ttft_s, dep.cfg.slo.tpot_s)
        ts = timeseries[timeseries["deployment"] == dep.name]
        per_window = ts.groupby("time_s", sort=True).agg(
            power=("power_w", "sum"), share=("budget_share_w", "first"), window=("window_s", "first"),
            target=("target_tokens_per_s", "first"))
        replica_tput = ts.drop_duplicates(["time_s", "replica"]).groupby("time_s", sort=True)[
            "throughput_tokens_per_s"].sum()
        power, share_w = per_window["power"].to_numpy(), per_window["share"].to_numpy()
        system_j = _system_energy_j(power, per_window["window"].to_numpy(), len(dep.gpus), power_cfg)
        itl = ItlPieces.concat(e.itl_pieces() for e in dep.engines)
        itl_all.append(itl)
        itl_pct = percentiles(itl)
        deployments[dep.name] = {
            "model": dep.model.name, "gpu": dep.gpu_spec.name, "num_gpus": len(dep.gpus),
            "requests_submitted": len(reqs), "requests_completed": len(done), "requests_dropped": len(reqs) - len(done),
            "output_tokens": int(tokens), "throughput_tokens_per_s": tokens / end if end > 0 else 0.0,
            "energy_j": energy, "avg_power_w": energy / end if end > 0 else 0.0,
            "tokens_per_j": tokens / energy if energy > 0 else 0.0,
            "gpu_utilization": mean_utilization(ts),
            **_latency(done), **itl_pct,
            "slo_attainment": slo / len(reqs) if len(reqs) else math.nan,
            "budget_violation_fraction": _violations(power, share_w),
            "power_tracking_error_w": _tracking_error(power, share_w),
            "throughput_target_tokens_per_s": dep.target_tokens_per_s,
            "qos_violation_fraction": _qos(replica_tput.to_numpy(), per_window["target"].to_numpy()),
            "system_energy_j": system_j, "system_tokens_per_j": tokens / system_j if system_j > 0 else 0.0,
            "kv_cache_tokens_per_replica": dep.kv_capacity_tokens,
            "engine_iterations": int(sum(e.iterations for e in dep.engines)),
            "preemptions": int(sum(e.preemptions for e in dep.engines)),
            "sim_events": dep.events_scheduled(),
            "wall_s": result.wall_s,
        }
        tot_energy += energy
        tot_system_j += system_j
        tot_tokens += tokens
        tot_completed += len(done)
        tot_dropped += len(reqs) - len(done)
        tot_slo += slo
    done_all = requests[requests["status"] == "completed"]
    bw = np.array(result.budget_windows, dtype=float).reshape(-1, 3)
    totals = {
        "duration_s": end, "num_gpus": total_gpus,
        "requests_completed": tot_completed, "requests_dropped": tot_dropped,
        "output_tokens": int(tot_tokens), "throughput_tokens_per_s": tot_tokens / end if end > 0 else 0.0,
        "energy_j": tot_energy, "avg_power_w": tot_energy / end if end > 0 else 0.0,
        "tokens_per_j": tot_tokens / tot_energy if tot_energy > 0 else 0.0,
        "gpu_utilization": mean_utilization(timeseries),
        **_latency(done_all), **(itl_pct if len(itl_all) == 1 else percentiles(ItlPieces.concat(itl_all))),
        "slo_attainment": tot_slo / len(requests) if len(requests) else math.nan,
        "budget_violation_fraction": _violations(bw[:, 1], bw[:, 2]),
        "power_tracking_error_w": _tracking_error(bw[:, 1], bw[:, 2]),
        "budget_infeasible_fraction": result.infeasible_windows / len(bw) if len(bw) else 0.0,
        "qos_violation_fraction": _mean_defined([d["qos_violation_fraction"] for d in deployments.values()]),
        "system_energy_j": tot_system_j, "system_tokens_per_j": tot_tokens / tot_system_j if tot_system_j > 0 else 0.0,
        "sim_events": result.sim_events, "wall_s": result.wall_s,
    }
    gpus = sorted({d.gpu for d in result.scenario.deployments})
    return {"scenario": result.scenario.name, "seed": result.scenario.seed, "policy": result.scenario.control.policy,
            "calibration_files": {g: calibration_file(g) for g in gpus},  # which fit each GPU's physics came from
            "totals": totals, "deployments": deployments}
