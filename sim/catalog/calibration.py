"""Fitted physics parameters, read from ``traces/calibration/<name>.json`` (written by ``pals calibrate``).

A file holds the parameters fitted for one GPU type and the engine measured on it::

    {"gpu": "a100-sxm4-80gb", "applies_to": ["a100-sxm4-80gb", "a100-sxm4-40gb"],
     "gpu_params": {"compute_efficiency": 0.55, ...}, "engine": {"step_s": 0.002, ...},
     "fitted_on": {"table": ..., "rows": ..., "sources": [...], "models": [...]}, "fit": {...}}

``gpu_params`` override the catalog's first estimates for every GPU in ``applies_to`` (the same die and
board power management); ``engine`` gives the defaults of the engine-overhead fields of a scenario.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

CALIBRATION_DIR = Path(os.environ.get("PALS_CALIBRATION_DIR",
                                      Path(__file__).resolve().parents[2] / "traces" / "calibration"))
GPU_FIELDS = ("compute_efficiency", "memory_efficiency", "link_efficiency", "collective_latency_s", "idle_power_w",
              "active_base_power_w", "compute_power_w", "memory_power_w", "kv_power_w", "host_power_share",
              "voltage_floor", "voltage_knee")


@cache
def calibrations() -> dict[str, dict[str, Any]]:
    """Every calibration file, keyed by each GPU name it applies to (a GPU's own file wins)."""
    found: dict[str, dict[str, Any]] = {}
    if not CALIBRATION_DIR.is_dir():
        return found
    files = sorted(CALIBRATION_DIR.glob("*.json"))
    docs = [json.loads(f.read_text(encoding="utf-8")) | {"path": str(f)} for f in files]
    for doc in docs:
        for name in doc.get("applies_to", [doc["gpu"]]):
            if name not in found or doc["gpu"] == name:
                found[name] = doc
    return found


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
