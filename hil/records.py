"""What a hardware run recorded, shaped like the simulator's ``RunResult`` so that ``sim.metrics`` builds the
same ``requests.parquet``, ``timeseries.parquet`` and ``summary.json`` from it.

``sim.metrics.summarize`` reads a deployment's GPUs (energy counters), engines (tokens generated) and request
lists; ``HilDeploymentRecords`` offers exactly those, from measurements: energy is each GPU's counter change
since the run started, tokens are the output tokens the server streamed. Figures a real server does not report
(engine iterations, preemptions, KV-cache size) come out as null in the summary, never as guesses.
``write_records`` writes them as ``pals run`` writes its outputs, each file atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hil.report import hil_report
from sim.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from sim.itl import ItlPieces, from_token_times
from sim.metrics import requests_frame, summarize, timeseries_frame
from sim.plant import RunResult
from sim.scenario import DeploymentConfig, Scenario, scenario_to_yaml
from sim.workload import Request

UNMEASURED = ("engine_iterations", "preemptions", "kv_cache_tokens_per_replica")


@dataclass
class EnergyCounter:
    """A GPU's energy counter change since the run started (J), as ``sim.metrics`` reads it."""

    energy_j: float = 0.0

    def get_total_energy_j(self) -> float:
        """Energy used since the run started."""
        return self.energy_j


@dataclass
class ServerCounters:
    """The server's output-token count, as ``sim.metrics`` reads an engine's."""

    tokens: int = 0
    iterations: int = 0  # not observable on a real server; reported as null
    preemptions: int = 0  # idem
    token_times_s: dict[int, list[float]] | None = None  # request id -> streamed token times (final records only)

    def tokens_generated_now(self) -> int:
        """Output tokens streamed so far."""
        return self.tokens

    def itl_pieces(self) -> ItlPieces:
        """The gaps between each request's streamed tokens (none before the run's final records)."""
        return from_token_times(self.token_times_s)


@dataclass
class HilDeploymentRecords:
    """One deployment's measured records, in the shape ``sim.metrics`` expects of a simulated one."""

    name: str
    cfg: DeploymentConfig
    model: Any  # the catalog ModelSpec (name)
    gpu_spec: Any  # the catalog GpuSpec (name)
    gpus: list[EnergyCounter]
    engines: list[ServerCounters]
    target_tokens_per_s: float
    requests: list[Request] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)
    kv_capacity_tokens: float = math.nan

    def events_scheduled(self) -> int:
        """A hardware run schedules no simulation events."""
        return 0


def copy_request(req: Request) -> Request:
    """A detached copy of a request record."""
    out = Request(req.id, req.arrival_s, req.prompt_tokens, req.output_tokens, req.deployment)
    for name in ("replica", "generated", "first_token_s", "finish_s", "preemptions", "drop_reason"):
        setattr(out, name, getattr(req, name))
    return out


def frames(result: RunResult, hil: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Summary, requests frame and timeseries frame of a hardware run (``hil``: facts added to the summary)."""
    requests = requests_frame(result)
    timeseries = timeseries_frame(result)
    summary = summarize(result, requests, timeseries)
    for block in (summary["totals"], *summary["deployments"].values()):
        block["sim_events"] = 0
        for key in UNMEASURED:
            if key in block:
                block[key] = None
    summary["hil"] = hil
    return summary, requests, timeseries


@dataclass
class RecordsCapture:
    """Copies of a run's records at one instant (see ``HilPlant.capture``)."""

    requests: list[Request]
    dropped: list[Request]
    in_flight: dict[int, bool]  # request id -> admitted (False: waiting for admission)
    rows: list[tuple]
    budget_windows: list[tuple[float, float, float]]
    energies_j: list[float]
    tokens: int
    end_s: float
    wall_s: float
    infeasible_windows: int
    hil: dict[str, Any]
    token_times_s: dict[int, list[float]] | None


@dataclass
class RunSnapshot:
    """Frames and summary of a hardware run, ready to write."""

    scenario: Scenario
    summary: dict[str, Any]
    requests: pd.DataFrame
    timeseries: pd.DataFrame
    token_times_s: dict[int, list[float]] | None = None  # request id -> streamed token times (final only)


def write_records(out_dir: Path, snap: RunSnapshot, report: bool) -> None:
    """Write a snapshot as ``pals run`` writes its outputs (each file atomically), plus ``token_times.parquet``
    (every streamed token's time: the inter-token times) when the snapshot has them."""
    write_text_atomic(out_dir / "scenario.resolved.yaml", scenario_to_yaml(snap.scenario))
    write_parquet_atomic(out_dir / "requests.parquet", snap.requests)
    write_parquet_atomic(out_dir / "timeseries.parquet", snap.timeseries)
    write_json_atomic(out_dir / "summary.json", snap.summary)
    if snap.token_times_s is not None:
        ids = [rid for rid, ts in snap.token_times_s.items() for _ in ts]
        idx = [i for ts in snap.token_times_s.values() for i in range(len(ts))]
        times = [t for ts in snap.token_times_s.values() for t in ts]
        write_parquet_atomic(out_dir / "token_times.parquet", pd.DataFrame(
            {"request_id": pd.Series(ids, dtype="int64"), "token": pd.Series(idx, dtype="int64"),
             "time_s": pd.Series(times, dtype="float64")}))
    if report:
        write_text_atomic(out_dir / "report.html", hil_report(snap.summary, snap.requests, snap.timeseries,
                                                              scenario_to_yaml(snap.scenario)))
