"""``pals hil profile``: measure a (power cap × batch) grid on a real node (or the twin) as a profile table.

At each operating point every GPU is set to the cap and ``batch`` clients keep exactly ``batch`` requests in
flight (each sends its next request when the previous one finishes: the ``saturate`` workload of
``sim.profile``). After a warm-up, a measurement window counts the output tokens streamed (throughput), the
GPUs' energy counters (mean power per GPU), the gaps between consecutive tokens of each request (median
inter-token latency) and, sampled every second of the window, the GPUs' utilization (the share of the time a
kernel ran: ``gpu_busy_fraction``). Rows are written with ``source = hil`` and read back by
``sim.profile.read_table``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from hil.engine import EngineDriver, ServerInfo, normalise_url, probe_server
from hil.limits import limits_note, restore_failures
from hil.telemetry import read_gpu, window_power_w
from sim.errors import PalsError
from sim.gpu import Gpu
from sim.itl import ItlPieces, quantiles_s
from sim.profile import normalise
from sim.workload import Request

DEFAULT_PROMPT_TOKENS = 512
DEFAULT_OUTPUT_TOKENS = 128
# Scenario seconds between utilization samples in a window: each NVML reading averages its own sample period
# (1/6 s to 1 s by GPU), so readings a second apart sample the window evenly (all of it where the period is 1 s).
UTILIZATION_SAMPLE_S = 1.0


class HilProfileError(PalsError):
    """A profile sweep that cannot run or measured nothing."""


@dataclass(frozen=True)
class ProfileSpec:
    """What is profiled: the deployment's identity in the table and the requests sent."""

    model: str | None  # catalog name (None: the server's model id)
    gpu: str | None  # catalog name (None: the devices' name)
    tensor_parallel: int | None  # None: every GPU given
    expert_parallel: int
    prompt_tokens: int
    output_tokens: int
    window_s: float  # scenario seconds measured per point
    warmup_s: float  # scenario seconds before the window
    seed: int = 0

    @classmethod
    def from_options(cls, scenario_path: Path | None, overrides: list[str], window_s: float,
                     warmup_s: float) -> ProfileSpec:
        """From ``--scenario`` (its first deployment: model, GPU, parallelism, mean token lengths) or defaults."""
        if scenario_path is None:
            return cls(None, None, None, 1, DEFAULT_PROMPT_TOKENS, DEFAULT_OUTPUT_TOKENS, window_s, warmup_s)
        from sim.scenario import load_scenario
        from sim.workload import token_means

        sc = load_scenario(scenario_path, overrides)
        dep = sc.deployments[0]
        if not isinstance(dep.model, str):
            raise HilProfileError(f"{scenario_path}: deployments.0.model: profiling needs a catalog model name")
        tokens = token_means(sc, 0)  # the load generator sends every request at the means
        prompt, output = tokens.prompt_tokens_mean, tokens.output_tokens_mean
        par = dep.parallelism
        return cls(dep.model, dep.gpu, par.tensor, par.tensor * par.data if par.expert else 1,
                   max(1, round(prompt)), max(1, round(output)), window_s, warmup_s, sc.seed)


@dataclass
class PointMeasurement:
    """One operating point as measured."""

    throughput_tokens_per_s: float
    power_w_per_gpu: float
    itl_median_s: float
    itl_p99_s: float
    requests_completed: int
    drop_reasons: list[str]
    gpu_busy_fraction: float = math.nan  # mean utilization over the window's samples and the GPUs


class _Saturator:
    """``batch`` closed-loop clients against one server, counting tokens and timing them."""

    def __init__(self, driver: EngineDriver, spec: ProfileSpec, batch: int, first_id: int) -> None:
        self.driver = driver
        self.spec = spec
        self.batch = batch
        self.next_id = first_id
        self.completed = 0
        self.drop_reasons: list[str] = []

    async def client(self) -> None:
        while True:
            req = Request(self.next_id, self.driver.clock(), self.spec.prompt_tokens, self.spec.output_tokens,
                          "profile")
            self.next_id += 1
            await self.driver.complete(req)
            if req.drop_reason:
                self.drop_reasons.append(req.drop_reason)
                if len(self.drop_reasons) >= 3 * self.batch and self.completed == 0:
                    return  # the server refuses this work: stop hammering it
                await asyncio.sleep(0.01)
            else:
                self.completed += 1


async def _measure_point(driver: EngineDriver, gpus: list[Gpu], spec: ProfileSpec, batch: int, speedup: float,
                         first_id: int) -> tuple[PointMeasurement, int]:
    sat = _Saturator(driver, spec, batch, first_id)
    clients = [asyncio.ensure_future(sat.client()) for _ in range(batch)]
    try:
        await asyncio.sleep(spec.warmup_s / speedup)
        start = await asyncio.to_thread(lambda: [read_gpu(g) for g in gpus])
        t0, tokens0, done0 = driver.clock(), driver.tokens_generated, sat.completed
        samples = max(1, round(spec.window_s / UTILIZATION_SAMPLE_S))
        utilization: list[float] = []
        for _ in range(samples):
            await asyncio.sleep(spec.window_s / samples / speedup)
            utilization += await asyncio.to_thread(lambda: [g.get_utilization() for g in gpus])
        end = await asyncio.to_thread(lambda: [read_gpu(g) for g in gpus])
        t1, tokens1 = driver.clock(), driver.tokens_generated
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    window = t1 - t0
    gaps = np.array([b - a for times in driver.token_times_s.values() for a, b in itertools.pairwise(times)
                     if a >= t0 and b <= t1], dtype=float)
    driver.token_times_s.clear()
    itl_p50, itl_p99 = quantiles_s(ItlPieces.of_gaps(gaps), (0.5, 0.99))
    powers = [window_power_w(a, b, window) for a, b in zip(start, end, strict=True)]
    return PointMeasurement((tokens1 - tokens0) / window, float(sum(powers) / len(powers)), itl_p50, itl_p99,
                            sat.completed - done0, sat.drop_reasons, float(np.mean(utilization))), sat.next_id


async def _sweep(spec: ProfileSpec, gpus: list[Gpu], url: str, caps_w: list[float], batches: list[int],
                 speedup: float, log: Callable[[str], None]) -> tuple[ServerInfo, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        server = await probe_server(client, url)
        t_start = time.perf_counter()
        driver = EngineDriver(client, server, lambda: (time.perf_counter() - t_start) * speedup, seed=spec.seed)
        next_id = 0
        for cap in caps_w:
            await asyncio.to_thread(lambda c=cap: [g.set_power_limit_w(c) for g in gpus])
            for batch in batches:
                m, next_id = await _measure_point(driver, gpus, spec, batch, speedup, next_id)
                if m.throughput_tokens_per_s <= 0:
                    why = m.drop_reasons[0] if m.drop_reasons else "no token streamed in the window"
                    raise HilProfileError(f"cap {cap:g} W, batch {batch}: nothing measured ({why}); lengthen "
                                          "--window-s or check the server")
                log(f"cap {cap:g} W, batch {batch}: {m.throughput_tokens_per_s:,.1f} tokens/s, "
                    f"{m.power_w_per_gpu:.1f} W per GPU, {m.requests_completed} requests in the window")
                rows.append({"power_cap_w": float(cap), "max_num_seqs": int(batch),
                             "throughput_tokens_per_s": m.throughput_tokens_per_s,
                             "power_w_per_gpu": m.power_w_per_gpu, "itl_median_s": m.itl_median_s,
                             "itl_p99_s": m.itl_p99_s,
                             # a device that reports no kernel time while serving does not measure it
                             "gpu_busy_fraction": m.gpu_busy_fraction if 0 < m.gpu_busy_fraction <= 1 else math.nan})
    return server, rows


def profile_node(spec: ProfileSpec, gpus: list[Gpu], endpoint: str, caps_w: list[float], batches: list[int], *,
                 speedup: float = 1.0, guard: Callable[[list[Gpu]], AbstractContextManager[Any]] | None = None,
                 log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Measure every cap × batch (caps outer) inside ``guard(gpus)``; return the profile table rows.

    A power limit that could not be set back at the end is logged, and listed in the table's
    ``attrs["power_limits_not_restored"]`` as ``(GPU index, error)`` (the measurements stand)."""
    if not gpus:
        raise HilProfileError("no GPU to profile")
    lo, hi = gpus[0].get_power_limit_range_w()
    bad = [c for c in caps_w if not lo <= c <= hi]
    if bad:
        raise HilProfileError(f"--caps {bad[0]:g}: outside the GPUs' power-limit range {lo:g}-{hi:g} W")
    if any(b < 1 for b in batches):
        raise HilProfileError("--batches: expected positive whole numbers")
    url = normalise_url(endpoint)
    if guard is None:
        from hil.limits import restored_power_limits as guard
    with guard(gpus) as limits:
        server, rows = asyncio.run(_sweep(spec, gpus, url, caps_w, batches, speedup, log or (lambda _m: None)))
    failures = restore_failures(limits)
    if failures and log is not None:
        log(f"error: {limits_note(failures)}")
    n = len(gpus)
    table = pd.DataFrame([{
        "source": "hil", "gpu": spec.gpu or gpus[0].name, "model": spec.model or server.model_id, "num_gpus": n,
        "tensor_parallel": spec.tensor_parallel or n, "expert_parallel": spec.expert_parallel, "workload": "saturate",
        "prompt_tokens_mean": float(spec.prompt_tokens), "output_tokens_mean": float(spec.output_tokens), **row}
        for row in rows])
    table = normalise(table, "hil profile")
    table.attrs["power_limits_not_restored"] = failures
    return table
