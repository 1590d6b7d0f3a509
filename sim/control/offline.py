"""Which offline model a deployment's controller plans with, and how a random forest gets its training rows.

``physics`` is the simulator's closed-form steady state (``PhysicsModel``). ``random_forest`` is trained on a
profile table: the scenario's ``control.profile_table`` (measured, e.g. ``pals hil profile`` or an imported
dataset), or, without one, a profile of the deployment measured in the simulator over the candidate grid
(the paper's offline profiling phase, done on the simulated plant).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

import pandas as pd

from sim.control.models import RandomForestModel
from sim.control.policies import batch_candidates, cap_candidates
from sim.errors import PalsError
from sim.profile import read_table, rows_for_deployment, simulated_profile

if TYPE_CHECKING:
    from sim.scenario import Scenario


def _workload_style(scenario: Scenario, index: int) -> str:
    return "static-batches" if scenario.deployments[index].workload.kind == "static-batches" else "saturate"


@lru_cache(maxsize=64)
def _simulated_rows(scenario_json: str, caps: tuple[float, ...], batches: tuple[int, ...], workload: str,
                    base_dir: str) -> pd.DataFrame:
    from sim.scenario import scenario_from_dict

    sc = scenario_from_dict(json.loads(scenario_json), "simulated profile", base_dir)
    return simulated_profile(sc, list(caps), list(batches), workload)


def training_rows(scenario: Scenario, index: int) -> pd.DataFrame:
    """The profile rows a deployment's random forest is trained on (see the module docstring)."""
    dep = scenario.deployments[index]
    style = _workload_style(scenario, index)
    par = dep.parallelism
    ep = par.tensor * par.data if par.expert else 1
    c = scenario.control
    if c.profile_table is not None:
        path = scenario.resolve_path(c.profile_table)
        if not isinstance(dep.model, str):
            raise PalsError(f"control.profile_table: deployments.{index}.model must be a catalog name to find its "
                            "rows in the table")
        return rows_for_deployment(read_table(path), dep.gpu, dep.model, par.tensor, ep, style,
                                   f"control.profile_table {path}")
    from sim.catalog.gpus import get_gpu

    gpu = get_gpu(dep.gpu)
    caps = tuple(cap_candidates(gpu.power_limit_min_w, gpu.power_limit_max_w, c.profile_cap_step_w))
    batches = tuple(batch_candidates(dep.engine.max_num_seqs))
    # Profile only this deployment, as it is configured (its replicas and workload's token means).
    data = scenario.model_dump(mode="json", exclude={"base_dir"})
    data["deployments"] = [data["deployments"][index]]
    return _simulated_rows(json.dumps(data, sort_keys=True), caps, batches, style, scenario.base_dir)


def random_forest_for(scenario: Scenario, index: int, num_gpus: int, prompt_tokens_mean: float,
                      output_tokens_mean: float) -> RandomForestModel:
    """A deployment's random-forest model, seeded from the scenario's seed."""
    rows = training_rows(scenario, index)
    return RandomForestModel(rows, num_gpus, prompt_tokens_mean, output_tokens_mean, seed=scenario.seed)
