"""Workloads: trace loading (real Azure and Mooncake traces, csv), token-count sampling, open-loop arrivals,
and each workload kind end to end through the simulator.

Expected figures come from the data sources themselves (the traces' README and raw files) or from the
distributions' definitions, never from the simulator's own output.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sim.run import RunOutputs, run_scenario
from sim.scenario import (
    ConstantTokens,
    GammaWorkload,
    LognormalTokens,
    PoissonWorkload,
    UniformTokens,
    scenario_from_dict,
)
from sim.workload import TraceError, load_trace, open_loop_arrivals, sample_tokens

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AZURE_CONV = DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
MOONCAKE_CONV = DATA / "mooncake" / "conversation_trace.jsonl"


def _need(path: Path) -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} is absent")
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


# ----- real traces --------------------------------------------------------------------------------------
def _raw_azure_span_s(path: Path) -> float:
    """Last minus first TIMESTAMP, parsed here independently of the loader (7 decimals cut to 6)."""
    stamps = []
    with path.open() as fh:
        next(fh)
        for line in fh:
            if line.strip():
                ts = line.split(",", 1)[0]
                stamps.append(datetime.strptime(ts[:26], "%Y-%m-%d %H:%M:%S.%f"))
    return (max(stamps) - min(stamps)).total_seconds()


def _check_trace_frame(df: pd.DataFrame) -> None:
    assert list(df.columns) == ["arrival_s", "prompt_tokens", "output_tokens"]
    assert df["arrival_s"].iloc[0] == 0.0
    assert df["arrival_s"].is_monotonic_increasing
    for col in ("prompt_tokens", "output_tokens"):
        assert df[col].dtype == np.int64
        assert (df[col] > 0).all()


@pytest.mark.data
@pytest.mark.parametrize(("path", "rows"), [(AZURE_CONV, 19_366), (AZURE_CODE, 8_819)],
                         ids=["conversation", "code"])
def test_azure_trace(path: Path, rows: int) -> None:
    """Row counts as stated in the data README; about one hour each."""
    df = load_trace(_need(path), "azure")
    assert len(df) == rows
    _check_trace_frame(df)
    span = df["arrival_s"].iloc[-1]
    # The code trace covers 57 min 16 s, the conversation trace 58 min 22 s: "one hour each".
    assert 3400 < span < 3700
    assert span == pytest.approx(_raw_azure_span_s(path), abs=1e-5)


@pytest.mark.data
def test_azure_trace_tokens_match_the_file() -> None:
    path = _need(AZURE_CONV)
    raw = pd.read_csv(path)
    df = load_trace(path, "azure")
    # The raw file is in time order, so the loader keeps row order and the token columns unchanged.
    assert (df["prompt_tokens"].to_numpy() == raw["ContextTokens"].to_numpy()).all()
    assert (df["output_tokens"].to_numpy() == raw["GeneratedTokens"].to_numpy()).all()


@pytest.mark.data
def test_mooncake_trace_arrivals_in_seconds() -> None:
    path = _need(MOONCAKE_CONV)
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    df = load_trace(path, "mooncake")
    assert len(df) == len(recs)
    _check_trace_frame(df)
    ts_ms = np.array([r["timestamp"] for r in recs], dtype=float)
    order = np.argsort(ts_ms, kind="stable")
    expected = (ts_ms[order] - ts_ms.min()) / 1000.0
    np.testing.assert_allclose(df["arrival_s"].to_numpy(), expected, rtol=0, atol=1e-9)
    # An hour-long trace: its timestamps in ms run to ~3.5e6, so the loader's seconds run to ~3.5e3.
    assert 3000 < df["arrival_s"].iloc[-1] < 3700
    assert (df["prompt_tokens"].to_numpy() == np.array([r["input_length"] for r in recs])[order]).all()
    assert (df["output_tokens"].to_numpy() == np.array([r["output_length"] for r in recs])[order]).all()


# ----- csv traces ---------------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_roundtrip(tmp_path: Path) -> None:
    src = pd.DataFrame({"arrival_s": [0.0, 0.25, 1.5, 7.125],
                        "prompt_tokens": [10, 2000, 1, 37],
                        "output_tokens": [5, 1, 300, 12]})
    path = tmp_path / "t.csv"
    src.to_csv(path, index=False)
    df = load_trace(path, "csv")
    pd.testing.assert_frame_equal(df, src.astype({"prompt_tokens": np.int64, "output_tokens": np.int64}))


def test_csv_sorted_and_shifted_to_zero(tmp_path: Path) -> None:
    path = _write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n"
                            "12,30,3\n10,10,1\n11,20,2\n")
    df = load_trace(path, "csv")
    assert df["arrival_s"].tolist() == [0.0, 1.0, 2.0]
    assert df["prompt_tokens"].tolist() == [10, 20, 30]  # each row keeps its own tokens
    assert df["output_tokens"].tolist() == [1, 2, 3]


def test_csv_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "arrival_s,prompt_tokens\n0,10\n")
    with pytest.raises(TraceError) as ei:
        load_trace(path, "csv")
    msg = str(ei.value)
    assert str(path) in msg
    assert "output_tokens" in msg  # the missing one
    assert "arrival_s, prompt_tokens, output_tokens" in msg  # what is expected


def test_csv_negative_arrival(tmp_path: Path) -> None:
    path = _write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n"
                            "0,10,1\n1,10,1\n-2,10,1\n")  # line 4
    with pytest.raises(TraceError) as ei:
        load_trace(path, "csv")
    msg = str(ei.value)
    assert str(path) in msg and "line 4" in msg and "arrival_s" in msg


def test_trace_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.csv", "csv")


@pytest.mark.parametrize(("name", "fmt", "text", "line"), [
    ("t.csv", "csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n\n1,-2,5\n", 4),
    ("t.jsonl", "mooncake", '{"timestamp": 0, "input_length": 10, "output_length": 5}\n\n'
                            '{"timestamp": 1, "input_length": -3, "output_length": 5}\n', 3),
], ids=["csv", "mooncake"])
def test_line_numbers_count_blank_lines(tmp_path: Path, name: str, fmt: str, text: str, line: int) -> None:
    path = _write(tmp_path, text, name)
    with pytest.raises(TraceError, match=f"line {line}:"):
        load_trace(path, fmt)


def test_csv_fractional_tokens_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n0,10.5,5\n")
    with pytest.raises(TraceError, match="line 2"):
        load_trace(path, "csv")


# ----- token counts -------------------------------------------------------------------------------------
def test_lognormal_median() -> None:
    dist = LognormalTokens(median=500, sigma=1.0)
    x = sample_tokens(dist, 20_000, np.random.default_rng(1))
    assert x.dtype == np.int64 and len(x) == 20_000
    assert np.median(x) == pytest.approx(500, rel=0.03)
    # sigma is the standard deviation of log(tokens)
    assert np.std(np.log(x)) == pytest.approx(1.0, rel=0.05)


def test_lognormal_clip() -> None:
    dist = LognormalTokens(median=100, sigma=2.0, min=20, max=300)
    x = sample_tokens(dist, 20_000, np.random.default_rng(2))
    assert x.min() == 20 and x.max() == 300  # sigma 2 reaches far past both bounds: both are hit
    # P(raw < 20) = Phi(log(0.2)/2) ~ 21 %; P(raw > 300) = 1 - Phi(log(3)/2) ~ 29 %
    assert np.mean(x == 20) == pytest.approx(0.21, abs=0.02)
    assert np.mean(x == 300) == pytest.approx(0.29, abs=0.02)


def test_constant_tokens() -> None:
    x = sample_tokens(ConstantTokens(value=77), 1000, np.random.default_rng(3))
    assert x.dtype == np.int64
    assert (x == 77).all() and len(x) == 1000


def test_uniform_tokens() -> None:
    x = sample_tokens(UniformTokens(low=5, high=9), 20_000, np.random.default_rng(4))
    assert x.dtype == np.int64
    assert set(np.unique(x).tolist()) == {5, 6, 7, 8, 9}  # both bounds inclusive
    assert x.mean() == pytest.approx(7.0, abs=0.05)


def test_tokens_same_seed_same_draws() -> None:
    dist = LognormalTokens(median=300, sigma=0.8)
    a = sample_tokens(dist, 100, np.random.default_rng(9))
    b = sample_tokens(dist, 100, np.random.default_rng(9))
    assert (a == b).all()


# ----- open-loop arrivals -------------------------------------------------------------------------------
def _cv(t: np.ndarray) -> float:
    gaps = np.diff(np.concatenate([[0.0], t]))
    return float(gaps.std() / gaps.mean())


def test_poisson_arrivals() -> None:
    rate, duration = 5.0, 20_000.0
    w = PoissonWorkload(rate_per_s=rate, prompt_tokens=1, output_tokens=1)
    t = open_loop_arrivals(w, duration, np.random.default_rng(5))
    mean = rate * duration
    assert abs(len(t) - mean) < 3 * math.sqrt(mean)
    assert (np.diff(t) >= 0).all() and t[0] >= 0 and t[-1] < duration
    assert _cv(t) == pytest.approx(1.0, abs=0.02)
    # Counts in disjoint 10 s windows are Poisson: variance equals mean.
    counts = np.bincount((t // 10).astype(int), minlength=int(duration // 10))
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_gamma_arrivals_cv() -> None:
    rate, duration = 5.0, 20_000.0
    w = GammaWorkload(rate_per_s=rate, cv=3.0, prompt_tokens=1, output_tokens=1)
    t = open_loop_arrivals(w, duration, np.random.default_rng(6))
    assert _cv(t) == pytest.approx(3.0, rel=0.10)
    # Mean rate still rate_per_s (burstier, so a wider band than Poisson: 9x the variance).
    mean = rate * duration
    assert abs(len(t) - mean) < 3 * 3.0 * math.sqrt(mean)
    assert (np.diff(t) >= 0).all() and t[-1] < duration


def test_requests_caps_the_count() -> None:
    w = PoissonWorkload(rate_per_s=10.0, prompt_tokens=1, output_tokens=1, requests=50)
    t = open_loop_arrivals(w, 1000.0, np.random.default_rng(7))
    assert len(t) == 50
    assert (np.diff(t) >= 0).all()


def test_requests_cap_not_binding_stops_at_duration() -> None:
    w = PoissonWorkload(rate_per_s=1.0, prompt_tokens=1, output_tokens=1, requests=10_000)
    t = open_loop_arrivals(w, 30.0, np.random.default_rng(8))
    assert 0 < len(t) < 10_000
    assert t[-1] < 30.0


@pytest.mark.parametrize("workload", [
    PoissonWorkload(rate_per_s=3.0, prompt_tokens=1, output_tokens=1),
    GammaWorkload(rate_per_s=3.0, cv=2.0, prompt_tokens=1, output_tokens=1),
], ids=["poisson", "gamma"])
def test_arrivals_same_seed_identical(workload: PoissonWorkload | GammaWorkload) -> None:
    a = open_loop_arrivals(workload, 500.0, np.random.default_rng(11))
    b = open_loop_arrivals(workload, 500.0, np.random.default_rng(11))
    c = open_loop_arrivals(workload, 500.0, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


# ----- end to end through the simulator -----------------------------------------------------------------
def _run(workload: dict[str, Any], duration_s: float = 600.0, base_dir: Path | str = ".") -> RunOutputs:
    data = {"name": "workload-test", "seed": 3, "duration_s": duration_s,
            "deployments": [{"name": "d", "model": "llama-3.1-8b", "gpu": "h100-sxm", "parallelism": {"tensor": 1},
                             "workload": workload}]}
    return run_scenario(scenario_from_dict(data, base_dir=base_dir))


VARIED = {"prompt_tokens": {"dist": "uniform", "low": 50, "high": 400},
          "output_tokens": {"dist": "uniform", "low": 5, "high": 80}}


def test_static_batches() -> None:
    out = _run({"kind": "static-batches", "batch_size": 4, "requests": 12, **VARIED})
    df = out.requests.sort_values("request_id")
    assert len(df) == 12 and (df["status"] == "completed").all()
    batches = [g for _, g in df.groupby("arrival_s", sort=True)]
    assert len(batches) == 3
    assert [len(b) for b in batches] == [4, 4, 4]
    assert batches[0]["arrival_s"].iloc[0] == 0.0
    for prev, nxt in itertools.pairwise(batches):
        # The next batch arrives exactly when the previous batch's last request finishes.
        assert nxt["arrival_s"].iloc[0] == prev["finish_s"].max()
    assert out.summary["totals"]["duration_s"] == df["finish_s"].max()


def test_closed_loop() -> None:
    clients = 3
    out = _run({"kind": "closed-loop", "clients": clients, "think_time_s": 0, "requests": 9, **VARIED})
    df = out.requests.sort_values(["arrival_s", "request_id"]).reset_index(drop=True)
    assert len(df) == 9 and (df["status"] == "completed").all()
    arrivals, finishes = df["arrival_s"].to_numpy(), df["finish_s"].to_numpy()
    # At most `clients` requests in the system at any time (intervals [arrival, finish)).
    for t in np.concatenate([arrivals, finishes]):
        assert int(np.sum((arrivals <= t) & (t < finishes))) <= clients
    # Every client starts at 0; each later request is sent the instant an earlier one finishes, one each.
    assert (arrivals[:clients] == 0.0).all()
    used: set[int] = set()
    for i in range(clients, len(df)):
        match = [j for j in range(i) if finishes[j] == arrivals[i] and j not in used]
        assert match, f"request {df['request_id'][i]} arrives at {arrivals[i]}, when no earlier request finished"
        used.add(match[0])


def test_requests_cap_ends_the_run_early() -> None:
    n, duration = 20, 600.0
    out = _run({"kind": "poisson", "rate_per_s": 5.0, "requests": n, "prompt_tokens": 100, "output_tokens": 20},
               duration_s=duration)
    df = out.requests
    assert len(df) == n and (df["status"] == "completed").all()
    assert (df["generated_tokens"] == 20).all()
    end = out.summary["totals"]["duration_s"]
    assert end < duration
    assert end == df["finish_s"].max()  # the run stops the moment the last request is served


def _tiny_trace(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n"
                    "0,100,10\n2,120,12\n5,140,14\n9,160,16\n")
    return path


def test_trace_replay_time_scale(tmp_path: Path) -> None:
    _tiny_trace(tmp_path)
    runs = {}
    for scale in (1.0, 0.5):
        out = _run({"kind": "trace", "path": "tiny.csv", "format": "csv", "time_scale": scale}, base_dir=tmp_path)
        runs[scale] = out.requests.sort_values("request_id").reset_index(drop=True)
        assert (runs[scale]["status"] == "completed").all()
    assert runs[1.0]["arrival_s"].tolist() == [0.0, 2.0, 5.0, 9.0]
    assert runs[0.5]["arrival_s"].tolist() == [0.0, 1.0, 2.5, 4.5]
    for r in runs.values():
        assert r["prompt_tokens"].tolist() == [100, 120, 140, 160]
        assert r["output_tokens"].tolist() == [10, 12, 14, 16]


def test_trace_replay_stops_at_duration_and_requests(tmp_path: Path) -> None:
    _tiny_trace(tmp_path)
    # Scaled arrivals 0, 1, 2.5, 4.5: a 4 s run issues the first three.
    out = _run({"kind": "trace", "path": "tiny.csv", "format": "csv", "time_scale": 0.5}, duration_s=4.0,
               base_dir=tmp_path)
    assert out.requests["arrival_s"].tolist() == [0.0, 1.0, 2.5]
    # requests: 2 replays the first two only.
    out = _run({"kind": "trace", "path": "tiny.csv", "format": "csv", "requests": 2}, base_dir=tmp_path)
    assert out.requests["arrival_s"].tolist() == [0.0, 2.0]
