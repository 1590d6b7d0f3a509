"""Scenario loading: the quickstart as written, overrides, budgets, round trip of the resolved YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sim.build import load_budget
from sim.run import run_scenario
from sim.scenario import ScenarioError, load_scenario, scenario_from_dict, scenario_to_yaml
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path):
    if "shared/data" in path.read_text() and not SHARED_DATA.exists():
        pytest.skip(f"{path.name} replays a trace from ../shared/data, which is not available")
    sc = load_scenario(path)
    assert sc.deployments


ISSUE_EXAMPLE = """
name: quickstart
seed: 42
duration_s: 600
deployments:
  - name: chat
    model: mixtral-8x7b            # catalog name, a path to a Hugging Face config.json, or an inline mapping
    gpu: h100-sxm
    replicas: 2
    parallelism: {tensor: 2}      # vLLM semantics; expert: true enables expert parallelism over the TP×DP ranks
    engine: {max_num_seqs: 128, max_num_batched_tokens: 8192}
    workload:
      kind: poisson               # poisson | gamma | closed-loop | static-batches | trace
      rate_per_s: 6
      prompt_tokens: {dist: lognormal, median: 1020, sigma: 0.9, max: 8192}
      output_tokens: {dist: lognormal, median: 129, sigma: 1.0, max: 2048}
    slo: {ttft_s: 2.0, tpot_s: 0.1}
power:
  budget_w: [{at_s: 0, w: 2400}, {at_s: 300, w: 1600}]   # a number, a schedule, or a CSV path
control:
  policy: static
  period_s: 0.5
  power_cap_w: 700
"""


def test_the_documented_example_loads_and_runs_as_written(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(ISSUE_EXAMPLE)
    sc = load_scenario(path, ["duration_s=30"])
    out = run_scenario(sc)
    assert out.summary["totals"]["requests_completed"] > 0


def test_quickstart_loads_as_written():
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    d = sc.deployments[0]
    assert (d.model, d.gpu, d.replicas, d.parallelism.tensor) == ("mixtral-8x7b", "h100-sxm", 2, 2)
    assert d.workload.kind == "poisson" and d.workload.rate_per_s == 12
    assert d.workload.prompt_tokens.median == 1020 and d.workload.output_tokens.max == 2048
    assert sc.control.power_cap_w == 700 and sc.control.period_s == 0.5
    budget = load_budget(sc)
    assert budget.at(0) == 2400 and budget.at(299.9) == 2400 and budget.at(300) == 1600 and budget.at(1e9) == 1600


def test_overrides_set_nested_fields_and_list_items():
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml",
                       ["control.power_cap_w=400", "deployments.0.replicas=4", "deployments.0.workload.rate_per_s=2.5",
                        "deployments.0.engine.stepping=iteration"])
    assert sc.control.power_cap_w == 400
    assert sc.deployments[0].replicas == 4
    assert sc.deployments[0].workload.rate_per_s == 2.5
    assert sc.deployments[0].engine.stepping == "iteration"
    with pytest.raises(ScenarioError, match=r"deployments\.3"):
        load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["deployments.3.replicas=1"])
    with pytest.raises(ScenarioError, match=r"FIELD\.PATH=VALUE"):
        load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["control.power_cap_w"])


def test_resolved_yaml_round_trips():
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    again = scenario_from_dict(yaml.safe_load(scenario_to_yaml(sc)), base_dir=sc.base_dir)
    assert again == sc


def test_budget_forms(tmp_path):
    base = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    base["power"] = {"budget_w": 1000}
    assert load_budget(scenario_from_dict(base)).at(123) == 1000
    csv = tmp_path / "budget.csv"
    csv.write_text("at_s,w\n0,3000\n60,2000\n120,2500\n")
    base["power"] = {"budget_w": str(csv)}
    b = load_budget(scenario_from_dict(base))
    assert (b.at(59), b.at(60), b.at(200)) == (3000, 2000, 2500)
    csv.write_text("at_s,w\n0,3000\n60,-5\n")
    with pytest.raises(ScenarioError, match="line 3"):
        scenario_from_dict(base)
    base["power"] = {"budget_w": [{"at_s": 10, "w": 100}]}
    with pytest.raises(ScenarioError, match=r"power\.budget_w"):
        scenario_from_dict(base, "s.yaml")


def test_cross_field_errors_name_the_values():
    base = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    base["deployments"][0]["engine"] = {"max_num_seqs": 512, "max_num_batched_tokens": 256}
    with pytest.raises(ScenarioError, match=r"max_num_batched_tokens=256.*max_num_seqs=512"):
        scenario_from_dict(base, "s.yaml")
    base["deployments"][0]["engine"] = {}
    base["deployments"][0]["parallelism"] = {"tensor": 3}
    with pytest.raises(ScenarioError, match="32 attention heads, not divisible by tensor=3"):
        scenario_from_dict(base, "s.yaml")
    base["deployments"][0]["parallelism"] = {"tensor": 1}
    base["deployments"][0]["model"] = "llama-3.1-70b"
    with pytest.raises(ScenarioError, match="GiB of weights per GPU"):
        scenario_from_dict(base, "s.yaml")
    base["deployments"][0]["model"] = "mixtral-8x7b"
    base["deployments"].append(dict(base["deployments"][0]))
    with pytest.raises(ScenarioError, match=r"unique.*chat"):
        scenario_from_dict(base, "s.yaml")
