"""Shared helpers: tiny scenarios built in code, and the path of the real reference data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from sim.scenario import Scenario, scenario_from_dict

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# CI runs the property tests on a fixed sequence of examples, so that a run is repeatable; locally they explore.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path}")
    return path


def tiny(workload: dict[str, Any], *, model: str = "llama-3.1-8b", gpu: str = "h100-sxm", tensor: int = 1,
         replicas: int = 1, duration_s: float = 60.0, engine: dict[str, Any] | None = None,
         control: dict[str, Any] | None = None, power: dict[str, Any] | None = None, seed: int = 0,
         **deployment: Any) -> Scenario:
    """A one-deployment scenario, validated like a YAML file."""
    data = {
        "name": "tiny", "seed": seed, "duration_s": duration_s,
        "deployments": [{"name": "d", "model": model, "gpu": gpu, "replicas": replicas,
                         "parallelism": {"tensor": tensor}, "engine": engine or {}, "workload": workload,
                         **deployment}],
        "control": control or {}, "power": power or {},
    }
    return scenario_from_dict(copy.deepcopy(data))
