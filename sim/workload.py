"""Request sources: open-loop arrivals (Poisson, Gamma), closed-loop clients, static batches, trace replay.

A request is a record (id, arrival_s, prompt_tokens, output_tokens) plus the engine's progress on it.
Generated workloads draw from one seeded ``numpy.random.Generator`` per deployment; traces are read with
errors that name the file and line.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import simpy

from sim.errors import PalsError
from sim.scenario import (
    ClosedLoopWorkload,
    ConstantTokens,
    GammaWorkload,
    LognormalTokens,
    PoissonWorkload,
    Scenario,
    StaticBatchesWorkload,
    TraceWorkload,
    UniformTokens,
)


class TraceError(PalsError):
    """A trace file that cannot be read."""


class Request:
    """One request and the engine's progress on it.

    ``num_tokens`` is prompt plus generated tokens; ``computed`` the tokens whose KV is in the cache.
    A step that brings ``computed`` up to ``num_tokens`` samples one new token.
    """

    __slots__ = ("admit_seq", "arrival_s", "computed", "decode_base", "deployment", "drop_reason", "finish_s",
                 "first_token_s", "gen_base", "generated", "id", "in_decode", "on_finish", "output_tokens",
                 "preemptions", "prompt_tokens", "replica")

    def __init__(self, rid: int, arrival_s: float, prompt_tokens: int, output_tokens: int, deployment: str) -> None:
        self.id = rid
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.deployment = deployment
        self.replica = -1
        self.computed = 0
        self.generated = 0
        # While decoding, the engine tracks progress by offsets from its iteration counter G:
        # computed = decode_base + G, generated = gen_base + G (see sim.engine).
        self.in_decode = False
        self.decode_base = 0
        self.gen_base = 0
        self.admit_seq = -1
        self.first_token_s = math.nan
        self.finish_s = math.nan
        self.preemptions = 0
        self.drop_reason = ""
        self.on_finish: Callable[[Request], None] | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return self.prompt_tokens + self.generated


def sample_tokens(dist: ConstantTokens | LognormalTokens | UniformTokens, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` token counts."""
    if isinstance(dist, ConstantTokens):
        return np.full(n, dist.value, dtype=np.int64)
    if isinstance(dist, UniformTokens):
        return rng.integers(dist.low, dist.high + 1, size=n, dtype=np.int64)
    x = np.rint(dist.median * np.exp(dist.sigma * rng.standard_normal(n)))
    return np.clip(x, dist.min, dist.max).astype(np.int64)


def open_loop_arrivals(w: PoissonWorkload | GammaWorkload, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration_s) (at most ``w.requests``)."""
    limit = w.requests if w.requests is not None else math.inf
    mean_gap = 1.0 / w.rate_per_s
    times: list[np.ndarray] = []
    t0, count = 0.0, 0
    chunk = int(min(limit, max(64, 1.2 * duration_s * w.rate_per_s + 64)))
    while t0 < duration_s and count < limit:
        if isinstance(w, GammaWorkload):
            shape = 1.0 / (w.cv**2)
            gaps = rng.gamma(shape, mean_gap / shape, size=chunk)
        else:
            gaps = rng.exponential(mean_gap, size=chunk)
        t = t0 + np.cumsum(gaps)
        times.append(t)
        t0 = float(t[-1])
        count += chunk
    arr = np.concatenate(times) if times else np.empty(0)
    arr = arr[arr < duration_s]
    return arr[: int(min(limit, len(arr)))]


# ----- traces -------------------------------------------------------------------------------------------
MAX_TRACE_TOKENS = 10_000_000  # far beyond any model's context; a larger count is a corrupt cell, not a request


def _require_columns(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(cols)}")


def _check_rows(df: pd.DataFrame, raw: dict[str, list], lines: np.ndarray, path: Path) -> None:
    """Reject the first bad cell, naming its line and showing it as written in the file."""
    for col in ("arrival_s", "prompt_tokens", "output_tokens"):
        x = df[col].to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            if col == "arrival_s":
                bad = ~np.isfinite(x) | (x < 0)
                want = "a non-negative number"
            else:
                bad = ~np.isfinite(x) | (x < 1) | (x != np.floor(x)) | (x > MAX_TRACE_TOKENS)
                want = f"a positive integer up to {MAX_TRACE_TOKENS:,}"
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TraceError(f"{path}: line {int(lines[i])}: {col} must be {want}, got {raw[col][i]!r}")


def _read_csv_rows(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """All cells as text, blank lines dropped, with each row's line number in the file."""
    try:
        raw = pd.read_csv(path, dtype=str, skip_blank_lines=False, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    raw = raw.fillna("")
    lines = raw.index.to_numpy() + 2  # the header is line 1
    keep = (raw != "").any(axis=1).to_numpy() if len(raw.columns) else np.zeros(len(raw), dtype=bool)
    return raw[keep].reset_index(drop=True), lines[keep]


def load_trace(path: str | Path, fmt: str) -> pd.DataFrame:
    """Read a trace as a DataFrame ``arrival_s, prompt_tokens, output_tokens`` sorted by arrival (from 0).

    Reads are cached per file version (path, size, modification time); treat the frame as read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    st = path.stat()
    return _load_trace_cached(str(path), fmt, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_trace_cached(path_text: str, fmt: str, _size: int, _mtime_ns: int) -> pd.DataFrame:
    path = Path(path_text)
    cols = ("arrival_s", "prompt_tokens", "output_tokens")
    if fmt == "mooncake":
        values: dict[str, list] = {c: [] for c in cols}
        line_numbers = []
        try:
            fh = path.open(encoding="utf-8")
            with fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        row = (rec["timestamp"], rec["input_length"], rec["output_length"])
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise TraceError(f"{path}: line {lineno}: expected a JSON object with timestamp (ms), "
                                         f"input_length, output_length ({type(exc).__name__}: {exc})") from None
                    for c, v in zip(cols, row, strict=True):
                        values[c].append(v)
                    line_numbers.append(lineno)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not UTF-8 text ({exc})") from None
        df = pd.DataFrame({c: pd.to_numeric(pd.Series(values[c], dtype=object), errors="coerce") for c in cols})
        lines = np.asarray(line_numbers, dtype=np.int64)
        raw_cells = values
        df["arrival_s"] = df["arrival_s"] / 1000.0
    else:
        raw, lines = _read_csv_rows(path)
        names = ("TIMESTAMP", "ContextTokens", "GeneratedTokens") if fmt == "azure" else cols
        _require_columns(raw, list(names), path)
        raw_cells = {c: raw[n].tolist() for c, n in zip(cols, names, strict=True)}
        if fmt == "azure":
            ts = pd.to_datetime(raw["TIMESTAMP"], errors="coerce", format="mixed")
            if ts.isna().any():
                i = int(np.flatnonzero(ts.isna().to_numpy())[0])
                raise TraceError(f"{path}: line {int(lines[i])}: TIMESTAMP {raw['TIMESTAMP'].iloc[i]!r} is not a "
                                 "date-time")
            arrival = (ts - ts.min()).dt.total_seconds() if len(ts) else pd.Series(dtype=float)
        else:
            arrival = pd.to_numeric(raw["arrival_s"], errors="coerce")
        df = pd.DataFrame({"arrival_s": arrival.to_numpy(dtype=float),
                           "prompt_tokens": pd.to_numeric(raw[names[1]], errors="coerce").to_numpy(dtype=float),
                           "output_tokens": pd.to_numeric(raw[names[2]], errors="coerce").to_numpy(dtype=float)})
    _check_rows(df, raw_cells, lines, path)
    if df.empty:
        raise TraceError(f"{path}: the trace holds no requests")
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    df["arrival_s"] = df["arrival_s"] - df["arrival_s"].iloc[0]
    df["prompt_tokens"] = df["prompt_tokens"].astype(np.int64)
    df["output_tokens"] = df["output_tokens"].astype(np.int64)
    return df


# ----- sources as SimPy processes ------------------------------------------------------------------------
MAX_DROPS_IN_A_ROW = 1000  # closed loop: this many dropped requests in a row and the clients stop
Submit = Callable[[Request], None]


class RequestSource:
    """Feeds one deployment's requests into ``submit`` as a SimPy process.

    ``exhausted`` becomes True once no further request will ever be issued.
    """

    def __init__(self, env: simpy.Environment, scenario: Scenario, deployment_index: int, submit: Submit,
                 rng: np.random.Generator) -> None:
        self.env = env
        self.dep = scenario.deployments[deployment_index]
        self.scenario = scenario
        self.submit = submit
        self.rng = rng
        self.issued = 0
        self.events = 0  # SimPy events this source scheduled
        self.exhausted = False
        self.on_exhausted: Callable[[], None] | None = None
        w = self.dep.workload
        if isinstance(w, PoissonWorkload | GammaWorkload):
            arrivals = open_loop_arrivals(w, scenario.duration_s, rng)
            prompts = sample_tokens(w.prompt_tokens, len(arrivals), rng)
            outputs = sample_tokens(w.output_tokens, len(arrivals), rng)
            # Without a request limit the process goes on past its last drawn arrival: the run lasts duration_s.
            self._replay(arrivals, prompts, outputs, finite=w.requests is not None)
        elif isinstance(w, TraceWorkload):
            df = load_trace(scenario.resolve_path(w.path), w.format)
            if w.requests is not None:
                df = df.iloc[: w.requests]
            arrivals = df["arrival_s"].to_numpy() * w.time_scale
            keep = arrivals < scenario.duration_s
            # A trace that goes on past duration_s is cut there: the run lasts duration_s, as for an open process.
            self._replay(arrivals[keep], df["prompt_tokens"].to_numpy()[keep], df["output_tokens"].to_numpy()[keep],
                         finite=bool(keep.all()))
        elif isinstance(w, ClosedLoopWorkload):
            self._remaining = w.requests if w.requests is not None else math.inf
            self._active_clients = w.clients
            self._drops_in_a_row = 0
            self._at_start(lambda: [self._closed_issue(delay=0.0) for _ in range(w.clients)])
        elif isinstance(w, StaticBatchesWorkload):
            self._remaining = w.requests if w.requests is not None else math.inf
            self._outstanding = 0
            self._batch_dropped = 0
            self._at_start(self._static_batch)
        else:  # pragma: no cover - the schema admits nothing else
            raise TypeError(f"unknown workload {w!r}")

    def _at_start(self, start: Callable[[], object]) -> None:
        """Run ``start`` at t=0 as a simulation event, once the whole model is wired."""
        self.events += 1
        self.env.timeout(0).callbacks.append(lambda _event: start())

    def _new(self, arrival_s: float, prompt: int, output: int) -> Request:
        req = Request(self.issued, arrival_s, int(prompt), int(output), self.dep.name)
        self.issued += 1
        return req

    def _finish_source(self) -> None:
        self.exhausted = True
        if self.on_exhausted is not None:
            self.on_exhausted()

    def _replay(self, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, finite: bool) -> None:
        """Issue pre-drawn requests at their arrival times: one timeout per distinct arrival instant, chained
        by callbacks (cheaper than a generator process for tens of thousands of arrivals). A ``finite`` source
        is exhausted after its last request (the run may end once all are served); another only stands for the
        part of an endless process before ``duration_s``, and the run lasts until then."""
        rows = list(zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True))
        env = self.env
        pos = 0

        def issue(_event: simpy.Event | None) -> None:
            nonlocal pos
            while pos < len(rows) and rows[pos][0] <= env.now:
                _, p, o = rows[pos]
                pos += 1
                self.submit(self._new(env.now, p, o))
            if pos < len(rows):
                self.events += 1
                env.timeout(rows[pos][0] - env.now).callbacks.append(issue)
            elif finite:
                self._finish_source()

        self.events += 1
        env.timeout(0).callbacks.append(issue)

    # closed loop: each finished request schedules its client's next one
    def _closed_issue(self, delay: float, defer: bool = False) -> None:
        """The client's next request, ``delay`` from now (``defer``: as an event even at no delay, so that a run
        of requests dropped on arrival does not nest calls)."""
        if self._remaining <= 0 or self.env.now + delay >= self.scenario.duration_s:
            # Only a workload whose requests have all been issued can end the run early; a client cut off by the
            # end of the run is not one served, and the run lasts until duration_s (as for an open process).
            self._active_clients -= 1
            if self._active_clients == 0 and self._remaining <= 0:
                self._finish_source()
            return
        self._remaining -= 1
        w = self.dep.workload
        prompt = int(sample_tokens(w.prompt_tokens, 1, self.rng)[0])
        output = int(sample_tokens(w.output_tokens, 1, self.rng)[0])

        def fire(_event: simpy.Event | None = None) -> None:
            req = self._new(self.env.now, prompt, output)
            req.on_finish = self._closed_done
            self.submit(req)

        if delay > 0 or defer:
            self.events += 1
            self.env.timeout(delay).callbacks.append(fire)
        else:
            fire()

    def _closed_done(self, req: Request) -> None:
        # A dropped request (too long for the engine, say) is the client's to count, not the end of the client: it
        # sends its next one. Only when every one of a long run of requests is dropped can the workload not be
        # served at all; then the clients stop rather than loop at one instant.
        self._drops_in_a_row = self._drops_in_a_row + 1 if req.drop_reason else 0
        if self._drops_in_a_row >= MAX_DROPS_IN_A_ROW:
            self._active_clients -= 1
            if self._active_clients == 0:
                self._finish_source()
            return
        w = self.dep.workload
        think = float(self.rng.exponential(w.think_time_s)) if w.think_time_s > 0 else 0.0
        self._closed_issue(think, defer=bool(req.drop_reason))

    # static batches: the next batch when every request of the previous one has finished
    def _static_batch(self) -> None:
        w = self.dep.workload
        n = int(min(w.batch_size, self._remaining))
        if n <= 0 or self.env.now >= self.scenario.duration_s:
            self._finish_source()
            return
        self._remaining -= n
        prompts = sample_tokens(w.prompt_tokens, n, self.rng)
        outputs = sample_tokens(w.output_tokens, n, self.rng)
        self._outstanding = self._batch_n = n
        self._batch_dropped = 0
        for p, o in zip(prompts.tolist(), outputs.tolist(), strict=True):
            req = self._new(self.env.now, p, o)
            req.on_finish = self._static_done
            self.submit(req)

    def _static_done(self, req: Request) -> None:
        self._outstanding -= 1
        self._batch_dropped += bool(req.drop_reason)
        if self._outstanding == 0:
            if self._batch_dropped == self._batch_n:
                # Every request of the batch was dropped (too long for the engine): stop, rather than issue
                # batches forever at one instant of simulated time.
                self._finish_source()
            else:
                self._static_batch()


class TokenStats(NamedTuple):
    """What an offline model plans for: the mean prompt and output lengths of a workload, and how much the
    output and prompt lengths vary (coefficients of variation, std / mean)."""

    prompt_tokens_mean: float
    output_tokens_mean: float
    output_tokens_cv: float
    prompt_tokens_cv: float = 0.0


def token_means(scenario: Scenario, deployment_index: int) -> TokenStats:
    """Mean prompt and output tokens of a deployment's workload, and the output and prompt lengths' variation.

    Traces: the file's. Generated workloads: those of 8,192 draws from a stream of its own, so the workload's
    own random streams are untouched.
    """
    w = scenario.deployments[deployment_index].workload
    if isinstance(w, TraceWorkload):
        df = load_trace(scenario.resolve_path(w.path), w.format)
        if w.requests is not None:
            df = df.iloc[: w.requests]
        prompts, outputs = df["prompt_tokens"].to_numpy(float), df["output_tokens"].to_numpy(float)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([scenario.seed, deployment_index, 0x70C3]))
        prompts = sample_tokens(w.prompt_tokens, 8192, rng).astype(float)
        outputs = sample_tokens(w.output_tokens, 8192, rng).astype(float)
    return TokenStats(float(prompts.mean()), float(outputs.mean()), float(outputs.std() / outputs.mean()),
                      float(prompts.std() / prompts.mean()))
