"""The profile table: measured or simulated operating points of a deployment, one row each, as CSV.

Columns (units in the names; ``itl_median_s``, ``itl_p99_s``, ``running_seqs_mean`` and ``gpu_busy_fraction`` may
be empty):

``source, gpu, model, num_gpus, tensor_parallel, expert_parallel, power_cap_w, max_num_seqs, workload,
prompt_tokens_mean, output_tokens_mean, output_tokens_cv, throughput_tokens_per_s, power_w_per_gpu, itl_median_s,
itl_p99_s, power_idle_tail_s, running_seqs_mean, prompt_tokens_cv, gpu_busy_fraction``

``itl_median_s`` and ``itl_p99_s`` are the median and 99th percentile of the inter-token latency over every
token (``sim.itl``); ``pals calibrate`` fits the median, ``pals validate`` reports both.

``running_seqs_mean`` (optional) is the mean number of sequences a replica was running (vLLM's
``num_requests_running``): ``max_num_seqs`` unless the step budget or the KV cache held fewer. ``pals validate``
compares it on ``saturate`` rows; the fit does not use it.

``gpu_busy_fraction`` (optional) is the GPUs' mean utilization as NVML reports it, as a fraction: the share of
the time one or more kernels ran (the PALS table's ``avg_gpu_util``). The rest is the host's work between
kernels (scheduling, input preparation, sampling) and, on steps launched kernel by kernel, the GPU waiting for
launches. It shows how a step's time splits between work that slows with the clock and work that does not;
``pals validate`` compares it, the fit does not use it.

``output_tokens_cv`` (optional, 0 when absent) is the coefficient of variation (std / mean) of the output
lengths. Under continuous batching it sets how much context the running sequences carry: a long request stays
in the batch longer, so the time-averaged decode context is ``P + O·(1 + cv²)/2``, not ``P + O/2``.

``prompt_tokens_cv`` (optional, 0 when absent) is the same for the prompt lengths (``saturate`` rows: the
predictors draw them log-normal). Under chunked prefill it shapes the inter-token latency: most mixed steps carry
a short prompt, a few a long one, so the median sits near a decode-only step and the 99th percentile far above it.

``power_idle_tail_s`` (optional, 0 when absent; ``static-batches`` rows only) says how the power was measured:
the mean covers one batch and then this many seconds of the GPUs idle after it. Argonne's benchmark samples
power from the start of one ``generate`` call until a second after it returns, so its averages mix a second of
idle draw into the batch's: at batch 1 on an H100 (a 7 s batch) that lowers the mean by ~40 W. The predictors
apply the same window to the predicted batch.

``workload`` is ``static-batches`` (batches of ``max_num_seqs`` prompts, the next when the previous has
finished: the PALS way) or ``saturate`` (enough clients to keep ``max_num_seqs`` sequences running: the
ML.ENERGY way). Throughput counts output tokens of the whole deployment; power is the mean per GPU.

Readers turn the public datasets of ``../shared/data`` into this table (``pals profile import``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.catalog.gpus import GPUS
from sim.catalog.models import MODEL_NAMES
from sim.errors import PalsError
from sim.io import write_text_atomic

COLUMNS = ("source", "gpu", "model", "num_gpus", "tensor_parallel", "expert_parallel", "power_cap_w",
           "max_num_seqs", "workload", "prompt_tokens_mean", "output_tokens_mean", "output_tokens_cv",
           "throughput_tokens_per_s", "power_w_per_gpu", "itl_median_s", "itl_p99_s", "power_idle_tail_s",
           "running_seqs_mean", "prompt_tokens_cv", "gpu_busy_fraction")
WORKLOADS = ("static-batches", "saturate")
_INT_COLUMNS = ("num_gpus", "tensor_parallel", "expert_parallel", "max_num_seqs")
# columns a table may leave out, and their values then
_OPTIONAL = {"output_tokens_cv": 0.0, "itl_median_s": math.nan, "itl_p99_s": math.nan, "power_idle_tail_s": 0.0,
             "running_seqs_mean": math.nan, "prompt_tokens_cv": 0.0, "gpu_busy_fraction": math.nan}
# measured only by some benchmarks: may be empty
_NULLABLE = ("itl_median_s", "itl_p99_s", "running_seqs_mean", "gpu_busy_fraction")
_POSITIVE = ("power_cap_w", "prompt_tokens_mean", "output_tokens_mean", "throughput_tokens_per_s", "power_w_per_gpu")

# Hugging Face ids in the public datasets → catalog names.
HF_MODELS = {
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-32B": "qwen3-32b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
}
# GPU names in the datasets → catalog names (Argonne's A100s are Polaris' A100 SXM4 40 GB).
MLENERGY_GPUS = {"H100": "h100-sxm", "B200": "b200"}
ARGONNE_GPUS = {"Nvidia A100 GPU": "a100-sxm4-40gb", "Nvidia H100 GPU": "h100-sxm"}

# HellaSwag validation prompts as PALS sent them (context + 4 endings + "Answer:"): 150-250 tokens.
PALS_PROMPT_TOKENS_MEAN = 200.0
PALS_OUTPUT_TOKENS = 5.0  # max_tokens=5, greedy
# ML.ENERGY v3's files give output lengths but not prompt lengths; LMArena chat prompts are short user turns
# plus the chat template. This is an assumption; override with --prompt-tokens-mean.
MLENERGY_PROMPT_TOKENS_MEAN = 300.0
# How much those prompt lengths vary, read from the files' inter-token latency tails: the 99th percentile is 1.5
# to 8 times the median (Llama-3.1-70B at 384 sequences: 436 ms against 55 ms, a step carrying a prefill of
# thousands of tokens), while the median stays within a few per cent of a decode-only step. Prompts all of one
# length cannot give both (the predicted ratio stays at 1.0-2.2); log-normal lengths with a coefficient of
# variation of 2 (first turns of a few dozen tokens, multi-turn contexts of thousands) give both, with the mean
# above. Override with --prompt-tokens-cv.
MLENERGY_PROMPT_TOKENS_CV = 2.0
# Argonne's benchmark_power.py: the power probe (NVML, every 0.25 s) runs from just before one generate call
# until one second after it returns (``time.sleep(1)`` before ``stop``).
ARGONNE_POWER_IDLE_TAIL_S = 1.0
MAX_TOKENS_CV = 10.0  # beyond this the lengths are one long request among many one-token ones


class ProfileError(PalsError):
    """A profile table or dataset that cannot be read."""


def _dtype(col: str) -> str:
    if col in _INT_COLUMNS:
        return "int64"
    if col in ("source", "gpu", "model", "workload"):
        return "object"
    return "float64"


def normalise(rows: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check a table's columns and values and give them their types; errors name ``where``, line and field."""
    missing = [c for c in COLUMNS if c not in rows.columns and c not in _OPTIONAL]
    if missing:
        raise ProfileError(f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    df = rows.copy()
    for col, default in _OPTIONAL.items():
        if col not in df.columns:
            df[col] = default
        elif not math.isnan(default):  # an empty cell of an optional column takes its default, as a missing column
            empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
            df[col] = df[col].where(~empty, default)
    for col in COLUMNS:
        if _dtype(col) == "object":
            bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
            _raise_first(bad, df, where, col, "a non-empty value")
            df[col] = df[col].astype(str).str.strip()
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna() & (df[col].astype(str).str.strip() != "")
        _raise_first(bad, df, where, col, "a number")
        _raise_first(values.isin([math.inf, -math.inf]), df, where, col, "a finite number")
        if col not in _NULLABLE:
            _raise_first(values.isna(), df, where, col, "a number")
        if col in _INT_COLUMNS:
            _raise_first((values < 1) | (values != values.round()), df, where, col, "a positive integer")
            df[col] = values.astype("int64")
        else:
            if col in _POSITIVE:
                _raise_first(values <= 0, df, where, col, "a positive number")
            elif col in _NULLABLE:
                _raise_first(values <= 0, df, where, col, "a positive number or empty")
            else:
                _raise_first(values < 0, df, where, col, "a non-negative number")
            df[col] = values.astype("float64")
    _raise_first(~df["workload"].isin(WORKLOADS), df, where, "workload", f"one of {', '.join(WORKLOADS)}")
    for col, what in (("output_tokens_cv", "output"), ("prompt_tokens_cv", "prompt")):
        _raise_first(df[col] > MAX_TOKENS_CV, df, where, col,
                     f"at most {MAX_TOKENS_CV:g} (std / mean of the {what} lengths)")
    _raise_first(df["num_gpus"] % df["tensor_parallel"] != 0, df, where, "num_gpus",
                 "a multiple of tensor_parallel (whole replicas)")
    ep = df["expert_parallel"]
    _raise_first((ep > 1) & ((ep % df["tensor_parallel"] != 0) | (df["num_gpus"] % ep != 0)), df, where,
                 "expert_parallel", "1, or a multiple of tensor_parallel that divides num_gpus (the GPUs one "
                 "replica spreads its experts over)")
    _raise_first(df["itl_p99_s"] < df["itl_median_s"], df, where, "itl_p99_s",
                 "a 99th percentile no smaller than itl_median_s")
    _raise_first(df["running_seqs_mean"] > df["max_num_seqs"], df, where, "running_seqs_mean",
                 "no more than max_num_seqs (sequences running per replica)")
    _raise_first(df["gpu_busy_fraction"] > 1.0, df, where, "gpu_busy_fraction",
                 "a fraction in (0, 1] (NVML utilization / 100) or empty")
    _raise_first((df["workload"] == "saturate") & (df["power_idle_tail_s"] > 0), df, where, "power_idle_tail_s",
                 "0 on a saturate row (an idle tail after one batch applies to static batches)")
    return df[list(COLUMNS)].reset_index(drop=True)


def _raise_first(bad: pd.Series, df: pd.DataFrame, where: str, col: str, expected: str) -> None:
    if bool(bad.any()):
        i = int(np.flatnonzero(bad.to_numpy())[0])
        value = df[col].iloc[i]
        shown = value.item() if isinstance(value, np.generic) else value  # 0.5, not np.float64(0.5)
        raise ProfileError(f"{where}, line {i + 2}, field {col!r}: expected {expected}, got {shown!r}")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read and check a profile table CSV."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"{p}: no such file (expected a profile table CSV)")
    try:
        rows = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ProfileError(f"{p}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if rows.empty:
        raise ProfileError(f"{p}: no rows (expected a header line and at least one operating point)")
    return normalise(rows, str(p))


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write a profile table atomically (checked first)."""
    table = normalise(df, str(path))
    write_text_atomic(Path(path), table.to_csv(index=False, float_format="%.6g"))


# ----- readers of the public datasets ---------------------------------------------------------------
def import_pals_a100(path: str | Path) -> pd.DataFrame:
    """The PALS authors' A100 TP4 sweep (``moe_summary_tp4.csv``): static batches, power cap × batch."""
    p = Path(path)
    raw = _read_csv(p, ("model", "tp", "cap_w", "batch", "avg_Tokens_per_s", "avg_gpu_power"))
    num = {c: _numbers(raw, c, p) for c in ("tp", "cap_w", "batch", "avg_Tokens_per_s", "avg_gpu_power")}
    table = pd.DataFrame({
        "source": "pals_a100", "gpu": "a100-sxm4-80gb", "model": raw["model"], "num_gpus": num["tp"],
        "tensor_parallel": num["tp"], "expert_parallel": 1, "power_cap_w": num["cap_w"], "max_num_seqs": num["batch"],
        "workload": "static-batches", "prompt_tokens_mean": PALS_PROMPT_TOKENS_MEAN,
        "output_tokens_mean": PALS_OUTPUT_TOKENS, "throughput_tokens_per_s": num["avg_Tokens_per_s"],
        "power_w_per_gpu": num["avg_gpu_power"], "itl_median_s": math.nan,
        "gpu_busy_fraction": _utilization(raw, p)}).reset_index(drop=True)
    return normalise(table, str(p))


def _utilization(raw: pd.DataFrame, p: Path) -> pd.Series | float:
    """The PALS table's ``avg_gpu_util`` (NVML utilization, percent) as a fraction; NaN where the file lacks it."""
    if "avg_gpu_util" not in raw.columns:
        return math.nan
    percent = _numbers(raw, "avg_gpu_util", p)
    bad = (percent <= 0) | (percent > 100)
    if bool(bad.any()):
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ProfileError(f"{p}, line {int(raw['_line'].iloc[i])}, column 'avg_gpu_util': expected a percentage "
                           f"in (0, 100], got {percent.iloc[i]:g}")
    return percent / 100.0


def import_mlenergy(path: str | Path, prompt_tokens_mean: float = MLENERGY_PROMPT_TOKENS_MEAN,
                    prompt_tokens_cv: float = MLENERGY_PROMPT_TOKENS_CV) -> pd.DataFrame:
    """ML.ENERGY v3 model files (a folder of them, or one): continuous batching at several ``max_num_seqs``.

    Only GPUs and models the catalog knows are kept. ``avg_power_watts`` is the run's total over its GPUs.
    """
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ProfileError(f"{p}: no ML.ENERGY JSON files found")
    rows = []
    for f in files:
        where = "top level"
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
            model = HF_MODELS.get(doc["model_id"])
            for i, c in enumerate(doc["configurations"]):
                where = f"configurations[{i}]"
                gpu = MLENERGY_GPUS.get(c["gpu_model"])
                if model is None or gpu is None:
                    continue
                par = c["parallelization"]
                n = int(c["num_gpus"])
                # The benchmark starts vLLM with --tensor-parallel-size equal to the GPU count (data parallel 1);
                # the file's tensor_parallel describes the MoE layers, whose experts expert parallelism spreads
                # whole over the same GPUs. Attention and the dense layers are tensor-parallel over all of them.
                tensor = n // max(1, int(par["data_parallel"]))
                rows.append({
                    "source": "mlenergy_v3", "gpu": gpu, "model": model, "num_gpus": n,
                    "tensor_parallel": tensor, "expert_parallel": int(par["expert_parallel"]),
                    "power_cap_w": GPUS[gpu].default_power_limit_w, "max_num_seqs": int(c["max_num_seqs"]),
                    "workload": "saturate", "prompt_tokens_mean": prompt_tokens_mean,
                    "output_tokens_mean": float(c["avg_output_len"]),
                    "output_tokens_cv": histogram_cv(c["output_length_distribution"]),
                    "throughput_tokens_per_s": float(c["output_throughput_tokens_per_sec"]),
                    "power_w_per_gpu": float(c["avg_power_watts"]) / n,
                    "itl_median_s": float(c["median_itl_ms"]) / 1000.0,
                    "itl_p99_s": float(c["p99_itl_ms"]) / 1000.0,
                    "running_seqs_mean": float(c.get("avg_batch_size") or math.nan),  # measured where given
                    "power_idle_tail_s": 0.0,  # power over the steady-state window only
                    "prompt_tokens_cv": prompt_tokens_cv})
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{f}: not an ML.ENERGY v3 model file ({where}: {exc!r})") from None
    return normalise(pd.DataFrame(rows, columns=list(COLUMNS)), str(p))


def histogram_cv(histogram: dict[str, Any]) -> float:
    """Coefficient of variation of a length histogram (``bins``: edges, ``counts``: one per bin), each bin at its
    middle."""
    edges = np.asarray(histogram["bins"], dtype=float)
    counts = np.asarray(histogram["counts"], dtype=float)
    if len(edges) != len(counts) + 1 or counts.sum() <= 0:
        raise ValueError(f"expected len(bins) = len(counts) + 1 and some counts, got {len(edges)} and {len(counts)}")
    mid = 0.5 * (edges[:-1] + edges[1:])
    mean = float(np.average(mid, weights=counts))
    return float(np.sqrt(np.average((mid - mean) ** 2, weights=counts)) / mean)


def import_argonne(path: str | Path) -> pd.DataFrame:
    """Argonne LLM-Inference-Bench power results: static batches, input = output tokens, power in mW.

    ``Throughput`` there counts input and output tokens; output throughput is ``batch × output / latency``.
    ``avg_power`` is GPU 0's (the probe reads one device; the ranks of a tensor-parallel replica draw alike), and
    it also covers a second of idle after the batch (``ARGONNE_POWER_IDLE_TAIL_S``).
    Only the vLLM rows are kept (the others are TensorRT-LLM and DeepSpeed-MII, other engines), and only GPUs
    the catalog has (not GH200).
    """
    p = Path(path)
    raw = _read_csv(p, ("Hardware", "Num of Hardware", "Framework", "Model", "Input Output Length", "Batch Size",
                        "Latency", "avg_power"))
    raw = raw[raw["Hardware"].isin(ARGONNE_GPUS) & raw["Model"].isin(HF_MODELS) & (raw["Framework"] == "vLLM")]
    n = _numbers(raw, "Num of Hardware", p)
    length = _numbers(raw, "Input Output Length", p)
    batch = _numbers(raw, "Batch Size", p)
    latency = _numbers(raw, "Latency", p)
    table = pd.DataFrame({
        "source": "argonne", "gpu": raw["Hardware"].map(ARGONNE_GPUS), "model": raw["Model"].map(HF_MODELS),
        "num_gpus": n, "tensor_parallel": n, "expert_parallel": 1,
        "power_cap_w": raw["Hardware"].map(ARGONNE_GPUS).map(lambda g: GPUS[g].default_power_limit_w),
        "max_num_seqs": batch, "workload": "static-batches", "prompt_tokens_mean": length,
        "output_tokens_mean": length, "throughput_tokens_per_s": batch * length / latency,
        "power_w_per_gpu": _numbers(raw, "avg_power", p) / 1000.0, "itl_median_s": math.nan,
        "power_idle_tail_s": ARGONNE_POWER_IDLE_TAIL_S}).reset_index(drop=True)
    return normalise(table, str(p))


def _read_csv(p: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    """A dataset CSV with its blank lines dropped; ``_line`` is each row's line number in the file."""
    if not p.is_file():
        raise ProfileError(f"{p}: no such file")
    try:
        raw = pd.read_csv(p, skip_blank_lines=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ProfileError(f"{p}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise ProfileError(f"{p}: missing column(s) {', '.join(missing)}")
    raw["_line"] = raw.index + 2  # the header is line 1
    return raw[raw.drop(columns="_line").notna().any(axis=1)]


def _numbers(raw: pd.DataFrame, col: str, p: Path) -> pd.Series:
    """A dataset column as numbers; the first cell that is not one is an error naming its line in the file."""
    values = pd.to_numeric(raw[col], errors="coerce")
    bad = values.isna() | values.isin([math.inf, -math.inf])
    if bool(bad.any()):
        i = int(np.flatnonzero(bad.to_numpy())[0])
        cell = raw[col].iloc[i]
        raise ProfileError(f"{p}, line {int(raw['_line'].iloc[i])}, column {col!r}: expected a number, got "
                           f"{cell.item() if isinstance(cell, np.generic) else cell!r}")
    return values


def simulated_profile(scenario: Any, caps_w: list[float], batches: list[int],
                      workload: str | None = None, deployment_index: int = 0) -> pd.DataFrame:
    """The profile table of a scenario's deployment (the first by default), from the simulator: one run per
    cap × batch.

    Each operating point is measured the way ``pals validate`` measures a row (``sim.operating_point``): the
    deployment's model, GPU and parallelism with the scenario workload's mean prompt and output lengths and their
    spread (coefficients of variation; the row's scenario draws log-normal lengths with them).
    """
    from sim.operating_point import simulate_row
    from sim.workload import token_means

    dep = scenario.deployments[deployment_index]
    kind = workload or ("static-batches" if dep.workload.kind == "static-batches" else "saturate")
    if kind not in WORKLOADS:
        raise ProfileError(f"--workload {kind!r}: expected one of {', '.join(WORKLOADS)}")
    if not isinstance(dep.model, str) or dep.model not in MODEL_NAMES:
        raise ProfileError(f"deployments.{deployment_index}.model: profiling needs a catalog model name (a profile "
                           f"row names its model, and validate / calibrate build it from the catalog), got "
                           f"{dep.model if isinstance(dep.model, str) else 'an inline config'!r}")
    tokens = token_means(scenario, deployment_index)
    gpu = GPUS[dep.gpu]
    bad = [c for c in caps_w if not gpu.power_limit_min_w <= c <= gpu.power_limit_max_w]
    if bad:
        raise ProfileError(f"--caps {bad[0]:g}: outside {dep.gpu}'s range {gpu.power_limit_min_w:g}-"
                           f"{gpu.power_limit_max_w:g} W")
    par = dep.parallelism
    n = dep.replicas * par.tensor * par.data
    rows = []
    for cap in caps_w:
        for b in batches:
            row = pd.Series({"source": "simulated", "gpu": dep.gpu, "model": dep.model, "num_gpus": n,
                             "tensor_parallel": par.tensor,
                             "expert_parallel": par.tensor * par.data if par.expert else 1,
                             "power_cap_w": float(cap), "max_num_seqs": int(b), "workload": kind,
                             "prompt_tokens_mean": tokens.prompt_tokens_mean,
                             "output_tokens_mean": tokens.output_tokens_mean,
                             "output_tokens_cv": tokens.output_tokens_cv, "prompt_tokens_cv": tokens.prompt_tokens_cv})
            p = simulate_row(row)
            rows.append({**row.to_dict(), "throughput_tokens_per_s": p.throughput_tokens_per_s,
                         "power_w_per_gpu": p.power_w_per_gpu, "itl_median_s": p.itl_median_s,
                         "itl_p99_s": p.itl_p99_s, "running_seqs_mean": p.running_seqs_mean,
                         "gpu_busy_fraction": p.gpu_busy_fraction})
    return normalise(pd.DataFrame(rows), "simulated profile")


def rows_for_deployment(table: pd.DataFrame, gpu: str, model: str, tensor_parallel: int, expert_parallel: int,
                        workload: str, where: str) -> pd.DataFrame:
    """The rows of a profile table measured on one deployment layout: its GPU, model, tensor and expert
    parallelism and workload style. Raises ``ProfileError`` naming what is missing when none match."""
    sel = table[(table["gpu"] == gpu) & (table["model"] == model)]
    if sel.empty:
        have = sorted({f"{g}/{m}" for g, m in zip(table["gpu"], table["model"], strict=True)})
        raise ProfileError(f"{where}: no rows for model {model!r} on {gpu!r} (the table has {', '.join(have)})")
    layout = sel[(sel["tensor_parallel"] == tensor_parallel) & (sel["expert_parallel"] == expert_parallel)]
    if layout.empty:
        have = sorted({f"TP{t}/EP{e}" for t, e in zip(sel["tensor_parallel"], sel["expert_parallel"], strict=True)})
        raise ProfileError(f"{where}: no rows for {model} on {gpu} with tensor_parallel {tensor_parallel} and "
                           f"expert_parallel {expert_parallel} (it has {', '.join(have)})")
    styled = layout[layout["workload"] == workload]
    if styled.empty:
        raise ProfileError(f"{where}: the rows for {model} on {gpu} are {layout['workload'].iloc[0]!r}, the "
                           f"deployment's workload is {workload!r}")
    if styled["power_cap_w"].nunique() < 2 or styled["max_num_seqs"].nunique() < 2:
        raise ProfileError(f"{where}: {len(styled)} rows for {model} on {gpu}: a model of cap and batch needs "
                           "at least two caps and two batch sizes")
    return styled.reset_index(drop=True)


IMPORTERS = {"pals-a100": import_pals_a100, "mlenergy": import_mlenergy, "argonne": import_argonne}


def check_catalog(table: pd.DataFrame, where: str) -> None:
    """Every row's GPU and model must be in the catalog."""
    for col, known in (("gpu", GPUS), ("model", MODEL_NAMES)):
        bad = ~table[col].isin(list(known))
        if bool(bad.any()):
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ProfileError(f"{where}, line {i + 2}, field {col!r}: {table[col].iloc[i]!r} is not in the catalog "
                               f"(expected one of {', '.join(sorted(known))})")
    lo = table["gpu"].map(lambda g: GPUS[g].power_limit_min_w)
    hi = table["gpu"].map(lambda g: GPUS[g].power_limit_max_w)
    bad = (table["power_cap_w"] < lo - 1e-6) | (table["power_cap_w"] > hi + 1e-6)
    if bool(bad.any()):
        i = int(np.flatnonzero(bad.to_numpy())[0])
        g = table["gpu"].iloc[i]
        raise ProfileError(f"{where}, line {i + 2}, field 'power_cap_w': {table['power_cap_w'].iloc[i]:g} W is outside "
                           f"{g}'s power-limit range {GPUS[g].power_limit_min_w:g}-{GPUS[g].power_limit_max_w:g} W")
