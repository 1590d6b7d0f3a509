"""MoE expert routing: which experts a batch touches, and how unevenly expert-parallel ranks are loaded.

A token picks ``k`` of ``E`` experts. With per-expert selection probabilities ``q_e`` (the chance that
one token selects expert ``e``; ``sum(q) = k``), a batch of ``n`` tokens touches expert ``e`` with
probability ``1 - (1 - q_e)^n`` (tokens route independently), so the expected number of distinct experts
is ``sum_e 1 - (1 - q_e)^n``. Small decode batches touch few experts and read few expert weights; large
batches touch them all. Popularity is uniform, Zipf, or measured counts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ExpertPopularity:
    """Per-token selection probability of each expert (sums to top-k)."""

    select_prob: tuple[float, ...]

    @property
    def num_experts(self) -> int:
        """Number of routed experts."""
        return len(self.select_prob)

    @classmethod
    def uniform(cls, num_experts: int, top_k: int) -> ExpertPopularity:
        """Every expert equally likely."""
        return cls(tuple([top_k / num_experts] * num_experts))

    @classmethod
    def from_weights(cls, weights: np.ndarray | list[float], top_k: int) -> ExpertPopularity:
        """From relative popularity weights (e.g. measured token counts per expert).

        Probabilities ``k·w_e/Σw`` are capped at 1 (an expert cannot be chosen twice by one token) and the
        excess spread over the others so that they still sum to ``k``.
        """
        w = np.asarray(weights, dtype=float)
        if w.ndim != 1 or len(w) < top_k or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("expert weights must be a non-negative vector with at least top-k entries")
        q = top_k * w / w.sum()
        for _ in range(len(q)):
            over = q > 1.0
            if not over.any():
                break
            excess = float((q[over] - 1.0).sum())
            q[over] = 1.0
            free = ~over & (q < 1.0)
            q[free] += excess * q[free] / q[free].sum()
        return cls(tuple(float(x) for x in q))

    @classmethod
    def zipf(cls, num_experts: int, top_k: int, exponent: float) -> ExpertPopularity:
        """Zipf-skewed popularity: weight of the r-th most popular expert ∝ r^-exponent."""
        ranks = np.arange(1, num_experts + 1, dtype=float)
        return cls.from_weights(ranks**-exponent, top_k)

    @classmethod
    def from_counts_csv(cls, path: str | Path, model: str, layer: int, top_k: int) -> ExpertPopularity:
        """Measured per-expert token counts, CSV columns ``model, layer, expert, count`` (extra columns ignored;
        counts summed over them)."""
        import pandas as pd

        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
        missing = [c for c in ("model", "layer", "expert", "count") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected model, layer, expert, count")
        counts_ok = pd.to_numeric(df["count"], errors="coerce")
        if (counts_ok.isna() | (counts_ok < 0)).any():
            i = int((counts_ok.isna() | (counts_ok < 0)).to_numpy().nonzero()[0][0])
            raise ValueError(f"{path}: line {i + 2}: count must be a non-negative number, got {df['count'].iloc[i]!r}")
        sel = df[(df["model"] == model) & (df["layer"] == layer)]
        if sel.empty:
            raise ValueError(f"{path}: no rows for model={model!r} layer={layer}")
        counts = sel.groupby("expert")["count"].sum().sort_index().to_numpy()
        return cls.from_weights(counts, top_k)

    def expected_distinct(self, num_tokens: int) -> float:
        """Expected number of distinct experts touched by ``num_tokens`` tokens."""
        if num_tokens <= 0:
            return 0.0
        return float(sum(1.0 - (1.0 - q) ** num_tokens for q in self.select_prob))


    def busiest_rank_distinct(self, num_tokens: int, num_ranks: int) -> float:
        """Expected distinct experts touched on the busiest of ``num_ranks`` expert-parallel ranks.

        Rank ``r`` holds a contiguous block of the experts (as vLLM places them). Expert ``e`` is touched with
        probability ``p_e = 1 - (1 - q_e)^n``; treating experts as independent, a rank's count of touched
        experts is Poisson-binomial, computed exactly, and the expected maximum over ranks is
        ``sum_k P(max >= k) = sum_k 1 - prod_r P(count_r < k)``. A small batch touches few experts and some
        ranks many more than others: the step waits for the rank with the most expert weights to read.
        """
        if num_tokens <= 0:
            return 0.0
        return _busiest_rank_distinct(self.select_prob, num_tokens, num_ranks)


@functools.lru_cache(maxsize=4096)
def _busiest_rank_distinct(select_prob: tuple[float, ...], num_tokens: int, num_ranks: int) -> float:
    p = 1.0 - (1.0 - np.asarray(select_prob, dtype=float)) ** num_tokens
    if num_ranks <= 1:
        return float(p.sum())
    blocks = np.array_split(p, num_ranks)
    size = max(len(b) for b in blocks)
    below = np.ones(size)  # prod_r P(count_r < k) for k = 1..size
    for block in blocks:
        pmf = np.zeros(size + 1)
        pmf[0] = 1.0
        for pe in block:  # add one Bernoulli(pe) to the count
            pmf[1:] = pmf[1:] * (1.0 - pe) + pmf[:-1] * pe
            pmf[0] *= 1.0 - pe
        below *= np.cumsum(pmf)[:size]
    return float(np.sum(1.0 - below))


def expected_distinct_uniform(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Closed form of ``ExpertPopularity.uniform(E, k).expected_distinct(n)``: ``E·(1-(1-k/E)^n)``."""
    if num_tokens <= 0 or num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def busiest_rank_factor(num_tokens: int, top_k: int, num_ranks: int) -> float:
    """Expected load of the busiest of ``num_ranks`` expert-parallel ranks over the mean load.

    Token-expert assignments land on ranks as a multinomial with ``n·k`` trials; the expected maximum of
    ``R`` roughly normal loads with mean ``μ = n·k/R`` and variance ``μ(1 - 1/R)`` is about
    ``μ + σ·sqrt(2 ln R)``. The step waits for that rank.
    """
    if num_ranks <= 1 or num_tokens <= 0:
        return 1.0
    mean = num_tokens * top_k / num_ranks
    sigma = math.sqrt(mean * (1.0 - 1.0 / num_ranks))
    return min(float(num_ranks), 1.0 + sigma * math.sqrt(2.0 * math.log(num_ranks)) / mean)
