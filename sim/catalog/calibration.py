"""Fitted physics parameters, read from ``traces/calibration/<name>.json`` (written by ``pals calibrate``).

A file holds the parameters fitted for one GPU type and the engine measured on it::

    {"gpu": "a100-sxm4-80gb", "applies_to": ["a100-sxm4-80gb", "a100-sxm4-40gb"],
     "gpu_params": {"compute_efficiency": 0.55, ...}, "engine": {"step_s": 0.002, ...},
     "fitted_on": {"table": ..., "rows": ..., "sources": [...], "models": [...]}, "fit": {...}}

``gpu_params`` override the catalog's first estimates for every GPU in ``applies_to`` (the same die and
board power management); ``engine`` gives the defaults of the engine-overhead fields of a scenario.

``PALS_CALIBRATION_DIR`` names a folder of your own fits (``pals calibrate --out-dir``): a GPU with a file there
uses it, every other GPU keeps the committed fit; ``pals calibrate`` without ``--out-dir`` writes there. Every
run's ``summary.json`` records the calibration file each GPU used.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from sim.errors import PalsError

COMMITTED_DIR = Path(__file__).resolve().parents[2] / "traces" / "calibration"
CALIBRATION_DIR = Path(os.environ["PALS_CALIBRATION_DIR"]) if os.environ.get("PALS_CALIBRATION_DIR") else COMMITTED_DIR
class CalibrationFileError(PalsError):
    """A calibration folder or file that cannot be read."""


GPU_FIELDS = ("compute_efficiency", "memory_efficiency", "link_efficiency", "collective_latency_s", "idle_power_w",
              "active_base_power_w", "compute_power_w", "memory_power_w", "kv_power_w", "host_power_share",
              "voltage_floor", "voltage_knee")


def _folder(folder: Path) -> dict[str, dict[str, Any]]:
    """The calibration files of one folder, keyed by each GPU name they apply to (a GPU's own file wins)."""
    found: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8")) | {"path": str(f)}
            names = doc.get("applies_to", [doc["gpu"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise CalibrationFileError(f"{f}: not a calibration file written by pals calibrate ({exc})") from None
        for name in names:
            if name not in found or doc["gpu"] == name:
                found[name] = doc
    return found


@cache
def _load() -> tuple[dict[str, dict[str, Any]], str | None]:
    found: dict[str, dict[str, Any]] = {}
    problem = None
    try:
        if COMMITTED_DIR.is_dir():
            found = _folder(COMMITTED_DIR)
        if CALIBRATION_DIR != COMMITTED_DIR:
            if not CALIBRATION_DIR.is_dir():
                raise CalibrationFileError(f"PALS_CALIBRATION_DIR={CALIBRATION_DIR}: no such folder (expected the "
                                           "--out-dir of pals calibrate: one JSON file per GPU)")
            found.update(_folder(CALIBRATION_DIR))
    except CalibrationFileError as exc:  # reported by the pals command; the library falls back to what it read
        problem = str(exc)
    return found, problem


def calibrations() -> dict[str, dict[str, Any]]:
    """Every calibration, keyed by each GPU name it applies to: the committed fits, overridden GPU by GPU by
    those in ``PALS_CALIBRATION_DIR`` (a folder or file that cannot be read: see ``calibration_problem``)."""
    return _load()[0]


def calibration_problem() -> str | None:
    """Why the calibrations could not all be read (the ``pals`` command refuses to run then), or None."""
    return _load()[1]


def calibration_file(gpu_name: str) -> str | None:
    """The calibration file ``gpu_name`` uses (None: never calibrated, the catalog's first estimates)."""
    doc = calibrations().get(gpu_name)
    return doc["path"] if doc else None


def gpu_params(gpu_name: str) -> dict[str, float]:
    """Fitted GPU parameters for ``gpu_name`` (empty when it was never calibrated)."""
    doc = calibrations().get(gpu_name)
    return {k: float(v) for k, v in (doc or {}).get("gpu_params", {}).items() if k in GPU_FIELDS}


def engine_params(gpu_name: str) -> dict[str, float]:
    """Fitted engine overheads measured on ``gpu_name`` (empty when never calibrated): every field of
    ``EngineOverheads`` the file gives."""
    from sim.physics import EngineOverheads  # imported here: the physics imports the catalog

    fields = {f.name for f in dataclasses.fields(EngineOverheads)}
    doc = calibrations().get(gpu_name)
    return {k: float(v) for k, v in (doc or {}).get("engine", {}).items() if k in fields}
