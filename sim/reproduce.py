"""Reproduce the PALS paper's three experiments in simulation, and run them again on H100s.

``pals reproduce --out DIR`` writes ``reproduction.json`` (keys ``single_node``, ``multi_node``,
``demand_response``; each study also holds an ``h100`` entry for the same study on 8xH100),
``reproduction.md`` (our figures beside the paper's) and ``report.html``.

The studies are built as scenarios in code; ``quick=True`` shortens every run (CI uses it).
"""

from __future__ import annotations

import html
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

from sim.io import write_json_atomic, write_text_atomic
from sim.physics import CUDA_GRAPH_MAX_TOKENS
from sim.report import render_report
from sim.run import RunOutputs, run_scenario
from sim.scenario import Scenario, scenario_from_dict

POLICIES = ("static", "batch-only", "cap-only", "pals", "oracle")

# Figures reported in the PALS paper (arXiv 2605.21427), as summarised in ../shared/data/README.md.
PAPER = {
    "single_node": {"normalized_tokens_per_j": {"pals": 1.263, "batch-only": 1.14}, "pals_share_of_oracle_gain": 0.95},
    "multi_node": {"qos_violation_fraction": {"static": [0.187, 0.352], "pals": [0.032, 0.053]},
                   "efficiency_gain": 0.121},
    "demand_response": {"max_low_power_throughput_gain": 0.22},
}

SINGLE_NODE_TARGET = 0.8  # of the unconstrained throughput
HELLASWAG_PROMPT = {"dist": "uniform", "low": 150, "high": 250}  # context + 4 options + "Answer:"


@dataclass(frozen=True)
class Platform:
    """The hardware of a study: GPU, GPUs per node, the baseline cap, and how each model is laid out."""

    key: str
    gpu: str
    gpus_per_node: int
    baseline_cap_w: float
    tensor: int  # tensor parallelism of one replica
    single_node_models: tuple[str, ...]
    multi_node_models: tuple[str, ...]
    multi_node_targets: tuple[float, ...]
    multi_node_budget_w: float  # system power of the whole cluster
    dr_model: str
    dr_nodes: int

    @property
    def replicas_per_node(self) -> int:
        """Replicas that fill one node."""
        return self.gpus_per_node // self.tensor


A100 = Platform(
    key="a100", gpu="a100-sxm4-80gb", gpus_per_node=4, baseline_cap_w=400, tensor=4,
    single_node_models=("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-moe-16b", "phi-3.5-moe", "mixtral-8x7b"),
    multi_node_models=("deepseek-moe-16b", "mixtral-8x7b", "olmoe-1b-7b"), multi_node_targets=(0.9, 0.6, 0.75),
    multi_node_budget_w=4800, dr_model="deepseek-moe-16b", dr_nodes=3)
H100 = Platform(
    key="h100", gpu="h100-sxm", gpus_per_node=8, baseline_cap_w=700, tensor=4,
    single_node_models=("mixtral-8x7b", "qwen3-30b-a3b"),
    multi_node_models=("mixtral-8x7b", "qwen3-30b-a3b"), multi_node_targets=(0.9, 0.6),
    # The same share of peak system power as the paper's 4,800 W of 3 A100 nodes (3 x (1.05 x 1600 + 345) W).
    multi_node_budget_w=round(4800 / (3 * (1.05 * 1600 + 345)) * 2 * (1.05 * 8 * 700 + 345)),
    dr_model="mixtral-8x7b", dr_nodes=1)


def _deployment(name: str, model: str, p: Platform, replicas: int, workload: dict[str, Any],
                target: float | None = None) -> dict[str, Any]:
    engine: dict[str, Any] = {"max_num_seqs": 64, "max_num_batched_tokens": 16384}
    if workload["kind"] == "static-batches":
        # As measured: batches through LLM.generate, whose engine keeps its default max_num_seqs and so
        # captures CUDA graphs up to 512 tokens (the batch is the number of prompts per call).
        engine["cuda_graph_max_tokens"] = CUDA_GRAPH_MAX_TOKENS
    dep: dict[str, Any] = {
        "name": name, "model": model, "gpu": p.gpu, "replicas": replicas, "parallelism": {"tensor": p.tensor},
        "engine": engine, "workload": workload,
    }
    if target is not None:
        dep["throughput_target"] = {"fraction_of_max": target}
    return dep


def _scenario(name: str, deployments: list[dict[str, Any]], duration_s: float, policy: str,
              power: dict[str, Any], control: dict[str, Any], seed: int = 7) -> Scenario:
    return scenario_from_dict({
        "name": name, "seed": seed, "duration_s": duration_s, "deployments": deployments, "power": power,
        "control": {"policy": policy, "period_s": 0.5, **control},
    }, f"reproduction study {name}")


def _run(sc: Scenario, runs: dict[str, RunOutputs], key: str) -> dict[str, Any]:
    """Run a study's scenario; keep the records only of the runs the report draws (demand response)."""
    out = run_scenario(sc)
    if key.startswith("dr/"):
        runs[key] = out
    return out.summary


# ----- study 1: single node, five policies ----------------------------------------------------------------
def single_node(p: Platform, quick: bool, runs: dict[str, RunOutputs]) -> dict[str, Any]:
    """Tokens/J of each policy on each model, normalised by the static baseline (max cap, batch 64).

    Workload: HellaSwag-like static batches of 64 prompts, 5 output tokens (how the PALS data was taken);
    target: 80 % of the static baseline's measured throughput (the unconstrained one).
    """
    duration = 60.0 if quick else 600.0
    per_model: dict[str, dict[str, float]] = {}
    qos_model: dict[str, dict[str, float]] = {}
    rf_model: dict[str, float] = {}
    rf_qos: dict[str, float] = {}
    for model in p.single_node_models:
        workload = {"kind": "static-batches", "batch_size": 64, "prompt_tokens": HELLASWAG_PROMPT,
                    "output_tokens": 5}
        per_model[model] = {}
        qos_model[model] = {}
        target = None
        for policy in POLICIES:  # static first: its throughput is the unconstrained one the target refers to
            dep = _deployment(model, model, p, p.replicas_per_node, workload)
            if target is not None:
                dep["throughput_target"] = {"tokens_per_s": target}
            sc = _scenario(f"single-{p.key}-{model}", [dep], duration, policy,
                           {"gpus_per_node": p.gpus_per_node},
                           {"power_cap_w": p.baseline_cap_w, "max_num_seqs": 64})
            totals = _run(sc, runs, f"single/{p.key}/{model}/{policy}")["totals"]
            per_model[model][policy] = totals["tokens_per_j"]
            qos_model[model][policy] = totals["qos_violation_fraction"]
            if policy == "static":
                target = SINGLE_NODE_TARGET * totals["throughput_tokens_per_s"]
        # pals again, planning with the paper's random forests trained on a simulated profile of the model.
        sc = _scenario(f"single-{p.key}-{model}", [dep], duration, "pals", {"gpus_per_node": p.gpus_per_node},
                       {"power_cap_w": p.baseline_cap_w, "max_num_seqs": 64, "offline_model": "random_forest"})
        totals = _run(sc, runs, f"single/{p.key}/{model}/pals-rf")["totals"]
        rf_model[model] = totals["tokens_per_j"] / per_model[model]["static"]
        rf_qos[model] = totals["qos_violation_fraction"]
    normalized = {pol: float(np.mean([per_model[m][pol] / per_model[m]["static"] for m in per_model]))
                  for pol in POLICIES}
    oracle_gain = normalized["oracle"] - 1.0
    return {
        "normalized_tokens_per_j": normalized,
        "per_model": {m: {pol: v / per_model[m]["static"] for pol, v in d.items()} for m, d in per_model.items()},
        "tokens_per_j": per_model,
        # Share of 0.5 s windows below the target (static has none: its throughput defines the target).
        "qos_violation_fraction": {pol: float(np.mean([qos_model[m][pol] for m in qos_model]))
                                   for pol in POLICIES if pol != "static"},
        "pals_share_of_oracle_gain": (normalized["pals"] - 1.0) / oracle_gain if oracle_gain > 0 else math.nan,
        # pals with each offline model: tokens/J vs static and windows below the target (means over models).
        "offline_models": {
            "physics": {"normalized_tokens_per_j": normalized["pals"],
                        "qos_violation_fraction": float(np.mean([qos_model[m]["pals"] for m in qos_model])),
                        "per_model": {m: per_model[m]["pals"] / per_model[m]["static"] for m in per_model}},
            "random_forest": {"normalized_tokens_per_j": float(np.mean(list(rf_model.values()))),
                              "qos_violation_fraction": float(np.mean(list(rf_qos.values()))),
                              "per_model": rf_model},
        },
    }


# ----- study 2: a cluster budget shared by three models -------------------------------------------------
PAPER_BUDGET_TIGHTNESS = 0.82  # 4,800 W over the ~5,850 W the paper's three A100 nodes draw unconstrained


def _short_outputs() -> dict[str, Any]:
    return {"dist": "lognormal", "median": 16, "sigma": 0.6, "max": 128}


def probe(p: Platform, model: str, replicas: int, seconds: float) -> tuple[float, float]:
    """Unconstrained throughput (tokens/s) and system power (W) of a deployment: max cap, batch 64,
    saturated by closed-loop clients."""
    w = {"kind": "closed-loop", "clients": 128 * replicas, "think_time_s": 0.0, "prompt_tokens": HELLASWAG_PROMPT,
         "output_tokens": _short_outputs()}
    sc = _scenario(f"probe-{p.key}-{model}", [_deployment(model, model, p, replicas, w)], seconds, "static",
                   {"gpus_per_node": p.gpus_per_node}, {"max_num_seqs": 64})
    t = run_scenario(sc).summary["totals"]
    return t["throughput_tokens_per_s"], t["system_energy_j"] / t["duration_s"]


def multi_node(p: Platform, quick: bool, runs: dict[str, RunOutputs]) -> dict[str, Any]:
    """Three (two on H100) models, one node each, targets as fractions of each model's measured
    unconstrained throughput, one system-power budget as tight as the paper's (82 % of the unconstrained
    draw); Poisson load 20 % above the unconstrained throughput, so throughput is what the configuration
    delivers. Static holds every GPU at the even share of the budget."""
    duration = 120.0 if quick else 3600.0
    deps = []
    unconstrained_w = 0.0
    for model, target in zip(p.multi_node_models, p.multi_node_targets, strict=True):
        tput, system_w = probe(p, model, p.replicas_per_node, 20.0 if quick else 60.0)
        unconstrained_w += system_w
        draws = 16 * np.exp(0.6 * np.random.default_rng(0).standard_normal(100_000))
        out_mean = float(np.mean(np.clip(np.rint(draws), 1, 128)))  # mean of _short_outputs()
        dep = _deployment(model, model, p, p.replicas_per_node,
                          {"kind": "poisson", "rate_per_s": 1.2 * tput / out_mean, "prompt_tokens": HELLASWAG_PROMPT,
                           "output_tokens": _short_outputs()})
        dep["throughput_target"] = {"tokens_per_s": target * tput}
        deps.append(dep)
    budget = PAPER_BUDGET_TIGHTNESS * unconstrained_w
    nodes = len(deps)
    even_cap = (budget - nodes * 345.0) / 1.05 / (nodes * p.gpus_per_node)
    power = {"budget_w": budget, "budget_applies_to": "system", "gpus_per_node": p.gpus_per_node}
    qos: dict[str, dict[str, float]] = {}
    eff: dict[str, float] = {}
    for policy in ("static", "cap-only", "pals"):
        split = "even" if policy == "static" else "need"
        control = {"power_cap_w": math.floor(even_cap), "max_num_seqs": 64}
        sc = _scenario(f"multi-{p.key}", deps, duration, policy, {**power, "split": split}, control)
        s = _run(sc, runs, f"multi/{p.key}/{policy}")
        qos[policy] = {m: s["deployments"][m]["qos_violation_fraction"] for m in p.multi_node_models}
        eff[policy] = s["totals"]["system_tokens_per_j"]
    return {"qos_violation_fraction": qos,
            "normalized_efficiency": {pol: v / eff["static"] for pol, v in eff.items()},
            "system_tokens_per_j": eff, "budget_w": budget, "unconstrained_system_w": unconstrained_w}


# ----- study 3: demand response ---------------------------------------------------------------------------
def dr_schedule(base_w: float, duration_s: float) -> list[dict[str, float]]:
    """A budget signal with three demand-response events (to 75 %, 55 % and 65 % of the base: the
    unconstrained draw)."""
    events = ((0.15, 0.30, 0.75), (0.45, 0.60, 0.55), (0.80, 0.90, 0.65))
    points = [{"at_s": 0.0, "w": base_w}]
    for start, end, level in events:
        points += [{"at_s": start * duration_s, "w": base_w * level}, {"at_s": end * duration_s, "w": base_w}]
    return points


def demand_response(p: Platform, quick: bool, runs: dict[str, RunOutputs]) -> dict[str, Any]:
    """One model on ``dr_nodes`` nodes, saturated by closed-loop clients, under a DR budget signal:
    fixed batch 64 with the cap tracking the budget (cap-only) against pals."""
    duration = 240.0 if quick else 3600.0
    replicas = p.replicas_per_node * p.dr_nodes
    workload = {"kind": "closed-loop", "clients": 128 * replicas, "think_time_s": 0.0,
                "prompt_tokens": HELLASWAG_PROMPT, "output_tokens": _short_outputs()}
    dep = _deployment(p.dr_model, p.dr_model, p, replicas, workload)
    base = probe(p, p.dr_model, replicas, 20.0 if quick else 60.0)[1]  # the unconstrained system draw
    schedule = dr_schedule(base, duration)
    power = {"budget_w": schedule, "budget_applies_to": "system", "gpus_per_node": p.gpus_per_node}
    tracking: dict[str, float] = {}
    throughput: dict[str, Any] = {}
    for policy in ("cap-only", "pals"):
        sc = _scenario(f"dr-{p.key}", [dep], duration, policy, power, {"max_num_seqs": 64})
        s = _run(sc, runs, f"dr/{p.key}/{policy}")
        tracking[policy] = s["totals"]["power_tracking_error_w"]
        ts = runs[f"dr/{p.key}/{policy}"].timeseries
        throughput[policy] = ts.drop_duplicates(["time_s", "replica"]).groupby("time_s")[
            "throughput_tokens_per_s"].sum()
    gains = []
    for start, end in _event_windows(schedule):
        a = throughput["pals"][(throughput["pals"].index > start) & (throughput["pals"].index <= end)].mean()
        b = throughput["cap-only"][(throughput["cap-only"].index > start) & (throughput["cap-only"].index <= end)]
        gains.append(a / b.mean() - 1.0)
    return {"tracking_error_w": tracking, "max_low_power_throughput_gain": float(max(gains)),
            "low_power_throughput_gains": gains, "budget_w": schedule}


def _event_windows(schedule: list[dict[str, float]]) -> list[tuple[float, float]]:
    base = schedule[0]["w"]
    out = []
    for a, b in itertools.pairwise(schedule):
        if a["w"] < base:
            out.append((a["at_s"], b["at_s"]))
    return out


# ----- the whole reproduction ------------------------------------------------------------------------------
def reproduce(out_dir: str | Path, quick: bool = False, platforms: tuple[Platform, ...] = (A100, H100)) -> dict:
    """Run the three studies on every platform; write reproduction.json, reproduction.md and report.html."""
    runs: dict[str, RunOutputs] = {}
    result: dict[str, Any] = {}
    for name, study in (("single_node", single_node), ("multi_node", multi_node),
                        ("demand_response", demand_response)):
        first, *others = platforms
        entry = study(first, quick, runs)
        for p in others:
            entry[p.key] = study(p, quick, runs)
        result[name] = entry
    result["paper"] = PAPER
    result["quick"] = quick
    out = Path(out_dir)
    write_json_atomic(out / "reproduction.json", result)
    write_text_atomic(out / "reproduction.md", reproduction_markdown(result))
    write_text_atomic(out / "report.html", reproduction_report(result, runs))
    return result


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def reproduction_markdown(r: dict[str, Any]) -> str:
    """Our figures beside the paper's."""
    s1, s2, s3 = r["single_node"], r["multi_node"], r["demand_response"]
    lines = ["# PALS reproduction in simulation", ""]
    if r.get("quick"):
        lines += ["*Quick mode: shortened runs; figures are indicative only.*", ""]
    lines += ["## 1. Single node (4xA100-80GB TP4, five MoE models; baseline 400 W, batch 64)", "",
              "| policy | tokens/J vs static (ours) | paper |", "|---|---|---|"]
    for pol in POLICIES:
        paper = PAPER["single_node"]["normalized_tokens_per_j"].get(pol, 1.0 if pol == "static" else None)
        lines.append(f"| {pol} | {s1['normalized_tokens_per_j'][pol]:.3f} | {paper if paper is not None else '-'} |")
    lines += ["", f"pals reaches {_pct(s1['pals_share_of_oracle_gain'])} of the oracle's gain (paper: 95 %). "
              "Windows below the target (80 % of the baseline's throughput), mean over models: "
              + ", ".join(f"{pol} {_pct(v)}" for pol, v in s1["qos_violation_fraction"].items())
              + ". Above 100 % of the oracle means pals trades some of its target for energy: its model is "
              "optimistic where the oracle measures.", "",
              "Per model (tokens/J vs static):", "", "| model | " + " | ".join(POLICIES) + " |",
              "|---" * (len(POLICIES) + 1) + "|"]
    for m, d in s1["per_model"].items():
        lines.append(f"| {m} | " + " | ".join(f"{d[p]:.3f}" for p in POLICIES) + " |")
    lines += ["", "pals with either offline model (the paper's random forests are trained here on a simulated "
              "profile of each model, caps every 50 W x batches 1-64):", "",
              "| offline model | tokens/J vs static | windows below target |", "|---|---|---|"]
    for name, d in s1.get("offline_models", {}).items():
        lines.append(f"| {name} | {d['normalized_tokens_per_j']:.3f} | {_pct(d['qos_violation_fraction'])} |")
    lines += ["", "## 2. Multi-node budget (3 nodes of 4xA100, targets 90/60/75 %)", "",
              "System budget: 82 % of the three nodes' unconstrained draw, as tight as the paper's 4,800 W.", "",
              "| policy | " + " | ".join(s2["qos_violation_fraction"]["static"]) + " | efficiency vs static |",
              "|---" * (len(s2["qos_violation_fraction"]["static"]) + 2) + "|"]
    for pol, q in s2["qos_violation_fraction"].items():
        lines.append(f"| {pol} | " + " | ".join(_pct(v) for v in q.values())
                     + f" | {s2['normalized_efficiency'][pol]:.3f} |")
    lines += ["", "Paper: static 18.7-35.2 % QoS violations, pals 3.2-5.3 %, +12.1 % efficiency.", "",
              "## 3. Demand response (3 nodes of deepseek-moe-16b, 1 hour)", "",
              "| policy | power tracking error (W) |", "|---|---|"]
    for pol, v in s3["tracking_error_w"].items():
        lines.append(f"| {pol} | {v:,.0f} |")
    lines += ["", f"pals keeps up to {_pct(s3['max_low_power_throughput_gain'])} more throughput than the "
              "fixed-batch cap-only policy in the low-budget windows (paper: up to 22 %).", ""]
    lines += ["## Where and why our figures differ from the paper's", "",
              "- **batch-only = static.** Tokens/J rises with the batch up to 64 at every cap, in the PALS "
              "measurements (`../shared/data/pals_a100`) as in our physics, so a controller that may only change "
              "the batch at 400 W cannot beat batch 64. The paper's +14 % cannot be reproduced from the "
              "measured tokens/J either: at every cap they are highest at batch 64 for all four models.",
              "- **Smaller gains from caps than the data allows.** In the PALS measurements the best "
              "configuration that keeps 80 % of the 400 W / batch-64 throughput gives 1.22-1.37x its tokens/J "
              "(mean 1.30; always batch 64, at 200-250 W), consistent with the paper's 1.263. The calibrated "
              "physics picks the same configurations (batch 64 at 200 W, 250 W for mixtral) and their throughput "
              "within a few %, but predicts the uncapped batch-64 draw ~8 % below the measured one for "
              "deepseek and qwen1.5 (288 against 312 W for deepseek): the baseline it improves on is more "
              "efficient than the measured one, so its gain is smaller (1.22-1.28x in closed form). pals can pass "
              "the oracle because its model is a little optimistic under a cap: it settles a cap step lower than "
              "the target strictly allows and trades some windows below the target for tokens/J.",
              "- **pals = cap-only.** Throughput and tokens/J rise with the batch up to 64 at every cap, so the "
              "joint search always picks batch 64 and differs from the fixed-batch policy only in the cap, which "
              "both choose the same way.",
              "- **Multi-node.** Our three simulated nodes draw ~4,000 W unconstrained (the paper's ~5,850 W), so "
              "the budget at the same tightness gives static an even share of ~180 W per GPU. There mixtral keeps "
              "about 66 % of its unconstrained throughput (closed form), above its 60 % target, and misses it "
              "in about one window in thirteen as the Poisson load fluctuates; deepseek and olmoe keep all of "
              "theirs at that share. The need split moves power to mixtral and cuts its misses to 0.2 % (taking "
              "enough from deepseek that it misses in 0.6 %), and gains 3.8 % of system tokens/J rather than the "
              "paper's 12 %: the share static gives is already near the tokens/J optimum of the data "
              "(150-250 W).",
              "- **8xH100.** No measurement in `../shared/data` varies an H100's power limit: its fit "
              "(ML.ENERGY, Argonne) sees only the default 700 W, so how its clock and HBM energy respond to caps "
              "is extrapolated (the voltage curve and the host-wait power stay at their first estimates, and the "
              "split of its draw between clocked base power and HBM traffic is loose): batch-64 chat serving "
              "(mixtral TP2, qwen3-30b-a3b, llama-3.1-8b; 300-token prompts on average, 350-token outputs, in "
              "closed form) loses 4-9 % of its throughput at 400 W, 22-33 % at 300 W, 40-48 % at 250 W and "
              "57-62 % at 200 W. Read the H100 gains below with that uncertainty.",
              "- **Demand response.** In our physics the throughput-maximising configuration under any power "
              "budget is batch 64 at the highest cap the budget allows, which is exactly what the fixed-batch "
              "policy that tracks the budget runs; pals finds the same configuration, so it keeps no more "
              "throughput. The paper's 22 % would need a regime where a smaller batch at a higher clock beats "
              "batch 64 at a lower clock under the same power, which neither the measurements nor the physics "
              "show for these models.",
              "- **QoS.** Violations count 0.5 s windows below the target; static batches and Poisson arrivals "
              "make window throughput bursty, so every policy has some, and pals aims 10 % above the target.",
              ""]
    for study, key in (("single_node", "normalized_tokens_per_j"),):
        if "h100" in r[study]:
            lines += ["## Beyond the paper: 8xH100 SXM (mixtral-8x7b, qwen3-30b-a3b)", "",
                      "| study | figure | value |", "|---|---|---|"]
            for pol, v in r[study]["h100"][key].items():
                lines.append(f"| single node | tokens/J vs static, {pol} | {v:.3f} |")
            for pol, q in r["multi_node"]["h100"]["qos_violation_fraction"].items():
                lines.append(f"| multi-node | QoS violations, {pol} | "
                             + ", ".join(f"{m} {_pct(v)}" for m, v in q.items()) + " |")
            for pol, v in r["multi_node"]["h100"]["normalized_efficiency"].items():
                lines.append(f"| multi-node | efficiency vs static, {pol} | {v:.3f} |")
            dr = r["demand_response"]["h100"]
            for pol, v in dr["tracking_error_w"].items():
                lines.append(f"| demand response | tracking error (W), {pol} | {v:,.0f} |")
            lines.append(f"| demand response | max low-power throughput gain of pals | "
                         f"{_pct(dr['max_low_power_throughput_gain'])} |")
    return "\n".join(lines) + "\n"


def reproduction_report(r: dict[str, Any], runs: dict[str, RunOutputs]) -> str:
    """Bars for the headline figures and the demand-response traces."""
    figs = []
    bars = go.Figure()
    for key in ("a100", "h100"):
        data = r["single_node"] if key == "a100" else r["single_node"].get("h100")
        if data:
            bars.add_bar(x=list(data["normalized_tokens_per_j"]), y=list(data["normalized_tokens_per_j"].values()),
                         name=key.upper())
    bars.update_layout(title="Single node: tokens/J relative to the static baseline", yaxis_title="x static")
    figs.append(bars)
    qos = go.Figure()
    for pol, q in r["multi_node"]["qos_violation_fraction"].items():
        qos.add_bar(x=list(q), y=list(q.values()), name=pol)
    qos.update_layout(title="Multi-node (A100): share of windows below the throughput target", barmode="group")
    figs.append(qos)
    dr = go.Figure()
    for pol in ("cap-only", "pals"):
        run = runs.get(f"dr/a100/{pol}")
        if run is None:
            continue
        ts = run.timeseries
        per_t = ts.groupby("time_s").agg(power=("power_w", "sum"), budget=("budget_w", "first"))
        t = ts.drop_duplicates(["time_s", "replica"]).groupby("time_s")["throughput_tokens_per_s"].sum()
        dr.add_scatter(x=per_t.index, y=per_t["power"], name=f"{pol} GPU power (W)", mode="lines")
        dr.add_scatter(x=t.index, y=t.values, name=f"{pol} tokens/s", mode="lines", yaxis="y2")
        if pol == "pals":
            dr.add_scatter(x=per_t.index, y=per_t["budget"], name="GPU budget (W)", mode="lines", line_shape="hv",
                           line={"dash": "dash", "color": "black"})
    dr.update_layout(title="Demand response (A100): power and throughput", xaxis_title="time (s)",
                     yaxis={"title": "W"}, yaxis2={"title": "tokens/s", "overlaying": "y", "side": "right"})
    figs.append(dr)
    md = html.escape(reproduction_markdown(r))
    return render_report("PALS reproduction", [("Figures", f"<pre>{md}</pre>")], figs)
