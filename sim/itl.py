"""Inter-token latency (ITL): the time between two successive output tokens of one request, over every such
pair in a run, as serving benchmarks report it (vLLM's ``benchmark_serving``, ML.ENERGY's median ITL).

It is not the time per output token (TPOT, each request's mean gap): under continuous batching most gaps are
pure-decode steps and a few are steps that also prefill new prompts, so the median ITL is a decode step while
the median TPOT averages the prefills in. A simulated engine knows every step's duration and how many decoding
requests it advanced, so its ITL distribution follows without recording tokens: a decode stretch of ``k``
iterations advancing ``n`` requests gives ``n·k`` gaps, its iterations' durations, which grow linearly with the
iteration index (in up to three runs, where a launch floor or a change of roofline term bends the line), so
each run's gaps lie evenly between its first and last durations. A hardware run has the streamed tokens' times.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np


class ItlPieces(NamedTuple):
    """Inter-token gaps as runs: ``gaps[i]`` gaps spread evenly over ``[first_s[i], last_s[i]]`` (a point when
    equal)."""

    first_s: np.ndarray
    last_s: np.ndarray
    gaps: np.ndarray

    @staticmethod
    def of(runs: Iterable[tuple[float, float, float]]) -> ItlPieces:
        """Pieces from ``(first_s, last_s, gaps)`` runs."""
        arr = np.array(list(runs), dtype=float).reshape(-1, 3)
        return ItlPieces(arr[:, 0], arr[:, 1], arr[:, 2])

    @staticmethod
    def of_gaps(gaps: np.ndarray) -> ItlPieces:
        """Pieces from single gaps (measured ones: each its own point)."""
        gaps = np.asarray(gaps, dtype=float)
        return ItlPieces(gaps, gaps, np.ones_like(gaps))

    @staticmethod
    def concat(parts: Iterable[ItlPieces]) -> ItlPieces:
        """All the gaps of several pieces."""
        parts = list(parts)
        if not parts:
            return ItlPieces.of([])
        return ItlPieces(*(np.concatenate([getattr(p, f) for p in parts]) for f in ItlPieces._fields))


def from_token_times(token_times_s: dict[int, list[float]] | None) -> ItlPieces:
    """The gaps between the successive streamed tokens of each request (none without token times)."""
    if not token_times_s:
        return ItlPieces.of([])
    return ItlPieces.of_gaps(np.array([b - a for times in token_times_s.values()
                                       for a, b in itertools.pairwise(times)], dtype=float))


def quantiles_s(pieces: ItlPieces, qs: tuple[float, ...]) -> list[float]:
    """The ``qs`` quantiles (0-1) of the gaps: for each, the smallest time at or below which that share of them
    lie, a run counted as spread uniformly over its span. NaN without gaps.

    The distribution is a sum of point masses and uniform densities, so its cumulative share is piecewise linear
    between the runs' ends: sorted once, it is inverted exactly.
    """
    first, last, gaps = pieces
    keep = gaps > 0
    first, last, gaps = first[keep], last[keep], gaps[keep]
    total = float(gaps.sum())
    if total <= 0.0:
        return [math.nan for _ in qs]
    spread = last > first
    density = gaps[spread] / (last[spread] - first[spread])
    zeros_u, zeros_p = np.zeros(int(spread.sum())), np.zeros(int((~spread).sum()))
    t = np.concatenate([first[spread], last[spread], first[~spread]])
    d_change = np.concatenate([density, -density, zeros_p])
    jump = np.concatenate([zeros_u, zeros_u, gaps[~spread]])
    order = np.argsort(t, kind="stable")
    t, d_change, jump = t[order], d_change[order], jump[order]
    d_after = np.maximum(np.cumsum(d_change), 0.0)  # the density in force just after each breakpoint
    area = np.concatenate([[0.0], d_after[:-1] * np.diff(t)])
    cdf = np.cumsum(area + jump)  # gaps at or below each breakpoint
    out = []
    for q in qs:
        target = q * total
        k = min(int(np.searchsorted(cdf, target, side="left")), len(t) - 1)
        if k == 0:
            out.append(float(t[0]))
            continue
        need, d = target - cdf[k - 1], d_after[k - 1]
        out.append(float(t[k - 1] + need / d) if d > 0.0 and need <= d * (t[k] - t[k - 1]) else float(t[k]))
    return out


def percentiles(pieces: ItlPieces) -> dict[str, float]:
    """Median and 99th percentile of the gaps, under the summary's names."""
    p50, p99 = quantiles_s(pieces, (0.5, 0.99))
    return {"itl_p50_s": p50, "itl_p99_s": p99}
