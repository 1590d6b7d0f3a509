"""``results.parquet`` of a sweep: one row per finished run, rewritten atomically after every run.

Each write goes to a temporary file in the same folder, is fsynced, then ``os.replace``d over the old file (and
the folder fsynced), so a sweep killed at any moment leaves the previous complete file: no finished run is lost
beyond the one being written, none is half-written, none is duplicated (rows are keyed by ``run_key``).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sim.sweep.expand import Run, Sweep
from sim.sweep.spec import SweepError

RESULTS_FILE = "results.parquet"

# Totals of summary.json recorded per run (NaN for a failed run).
METRIC_COLUMNS = (
    "duration_s", "num_gpus", "requests_completed", "requests_dropped", "output_tokens",
    "throughput_tokens_per_s", "energy_j", "avg_power_w", "tokens_per_j",
    "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s", "e2e_p99_s",
    "slo_attainment", "budget_violation_fraction", "power_tracking_error_w", "budget_infeasible_fraction",
    "qos_violation_fraction", "system_energy_j", "system_tokens_per_j", "sim_events",
)
RUN_COLUMNS = ("run_index", "run_key", "status", "error", "wall_s", "seed", "policy", "models", "peak_power_w",
               "overrides")


def _param_kind(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "float"
    if all(isinstance(v, str) for v in values):
        return "str"
    return "json"


class ResultsTable:
    """The rows of a sweep's results, keyed by run key, and their atomic Parquet file."""

    def __init__(self, sweep: Sweep, path: Path) -> None:
        self.sweep = sweep
        self.path = path
        self.kinds = {c: _param_kind([r.params[c] for r in sweep.runs]) for c in sweep.param_columns}
        self.rows: dict[str, dict[str, Any]] = {}

    @property
    def columns(self) -> list[str]:
        """Every column, in file order: run facts, parameters, metrics."""
        return [*RUN_COLUMNS, *self.sweep.param_columns, *METRIC_COLUMNS]

    def load(self) -> None:
        """Read the rows already recorded (``--resume``); refuse a file that is not this sweep's."""
        try:
            df = pd.read_parquet(self.path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise SweepError(f"{self.path}: not a readable Parquet file ({exc})") from None
        missing = [c for c in ("run_key", "status") if c not in df.columns]
        if missing:
            raise SweepError(f"{self.path}: not a sweep results file (no column {', '.join(missing)})")
        keys = {r.key for r in self.sweep.runs}
        foreign = [k for k in df["run_key"] if k not in keys]
        if foreign:
            raise SweepError(f"{self.path}: {len(foreign)} recorded run(s) are not runs of {self.sweep.spec_path} "
                             f"(was the spec or the base scenario changed?); use another --out")
        dup = df["run_key"][df["run_key"].duplicated()]
        if len(dup):
            raise SweepError(f"{self.path}: run {dup.iloc[0]} is recorded twice")
        # Only what the run produced comes from the file; its index, parameters, overrides, policy, models and peak
        # power come from the current expansion (seeds reordered, a grid key added at its base value: the same
        # runs, other indices and columns).
        runs = {r.key: r for r in self.sweep.runs}
        for rec in df.to_dict("records"):
            error = rec.get("error")
            wall_s = rec.get("wall_s")
            outcome = {"status": str(rec["status"]), "error": error if isinstance(error, str) else "",
                       "wall_s": math.nan if wall_s is None else float(wall_s),
                       "totals": {c: rec.get(c) for c in METRIC_COLUMNS}}
            run = runs[rec["run_key"]]
            self.rows[run.key] = self._row(run, outcome)

    def drop_failed(self) -> int:
        """Forget the failed rows (``--retry-failed``); returns how many."""
        failed = [k for k, r in self.rows.items() if r["status"] != "ok"]
        for k in failed:
            del self.rows[k]
        return len(failed)

    def record(self, run: Run, outcome: dict[str, Any]) -> None:
        """Add a finished run (``outcome`` from ``run_one``) and rewrite the file atomically."""
        self.rows[run.key] = self._row(run, outcome)
        self.write()

    def _row(self, run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
        """The row of ``run``: its facts and parameters from the expansion, status, error, wall time and
        metrics from ``outcome``."""
        row: dict[str, Any] = {
            "run_index": run.index, "run_key": run.key, "status": outcome["status"], "error": outcome["error"],
            "wall_s": outcome["wall_s"], "seed": run.seed, "policy": run.policy, "models": run.models,
            "peak_power_w": run.peak_power_w, "overrides": shlex.join(run.overrides),
        }
        for c in self.sweep.param_columns:
            v = run.params[c]
            row[c] = json.dumps(v, sort_keys=True) if self.kinds[c] == "json" else v
        totals = outcome.get("totals") or {}
        for c in METRIC_COLUMNS:
            v = totals.get(c)
            row[c] = math.nan if v is None else float(v)
        return row

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame ordered by run index, with fixed column types."""
        records = sorted(self.rows.values(), key=lambda r: int(r["run_index"]))
        df = pd.DataFrame(records, columns=self.columns)
        types: dict[str, str] = {"run_index": "int64", "seed": "int64", "wall_s": "float64", "peak_power_w": "float64",
                                 **dict.fromkeys(METRIC_COLUMNS, "float64")}
        for c in ("run_key", "status", "error", "policy", "models", "overrides"):
            types[c] = "object"
        for c, kind in self.kinds.items():
            types[c] = {"bool": "bool", "int": "int64", "float": "float64"}.get(kind, "object")
        return df.astype(types)

    def write(self) -> None:
        """Rewrite ``results.parquet``: temp file in the same folder, fsync, ``os.replace``, fsync the folder.

        A failed write (disk full, permissions) is a ``SweepError`` naming the file; the previous file is intact.
        """
        try:
            write_parquet_durable(self.path, self.frame())
        except OSError as exc:
            raise SweepError(f"{self.path}: cannot write ({exc.strerror or exc}); the runs recorded before are "
                             "in it: rerun with --resume") from None


def write_parquet_durable(path: Path, df: pd.DataFrame) -> None:
    """Write ``df`` to ``path`` atomically and durably (see the module docstring)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
