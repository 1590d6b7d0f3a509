"""The ``pals`` CLI on bad input: one clear message naming the file and the field (or line), exit code 2,
no Python traceback; and ``--set`` overrides, output preservation and ``pals schema`` on good input.

Every case runs the real CLI in a subprocess (``python -m sim.cli``), on scenarios written to ``tmp_path``
from quickstart.yaml's content with one field changed, so each failure has exactly one cause.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
SHORT_S = 2  # simulated seconds: keeps the runs that get as far as simulating short


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("FORCE_COLOR", "PY_COLORS", "CLICOLOR_FORCE"):
        env.pop(k, None)
    env["NO_COLOR"] = "1"
    return env


def pals(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sim.cli ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "sim.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=_env(), timeout=120)


def base() -> dict[str, Any]:
    """quickstart.yaml as a dict, with a short duration."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["duration_s"] = SHORT_S
    return data


def write_scenario(tmp_path: Path, change: Callable[[dict[str, Any]], None] | None = None,
                   name: str = "scenario.yaml") -> Path:
    data = copy.deepcopy(base())
    if change is not None:
        change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dep0(data: dict[str, Any]) -> dict[str, Any]:
    return data["deployments"][0]


def assert_clean_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, one one-line ``error:`` message on stderr holding every needle, nothing on stdout."""
    err = r.stderr
    assert "Traceback" not in err, err
    assert r.returncode == 2, (r.returncode, err)
    assert r.stdout.strip() == "", r.stdout  # no summary table: nothing ran to completion
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def test_python_m_sim_cli_is_the_pals_command() -> None:
    r = pals("--help")
    assert r.returncode == 0, r.stderr
    assert "run" in r.stdout and "schema" in r.stdout


def test_quickstart_dict_is_valid(tmp_path: Path) -> None:
    """The base every error case starts from runs: each case's failure is due to its one change."""
    path = write_scenario(tmp_path)
    r = pals("run", path, "--out", tmp_path / "out", "--no-report")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "summary.json").is_file()


# ----- schema errors ------------------------------------------------------------------------------------
def test_unknown_field(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: dep0(d)["engine"].__setitem__("max_num_seq", 64))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                       path.name, "deployments.0.engine.max_num_seq", "unknown field")


def test_wrong_type(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: d.__setitem__("duration_s", "abc"))
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"), path.name, "duration_s", "'abc'")
    assert "number" in msg


def test_negative_rate(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: dep0(d)["workload"].__setitem__("rate_per_s", -1))
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                             path.name, "deployments.0.workload.rate_per_s", "-1")
    assert "greater than 0" in msg


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    lines = QUICKSTART.read_text().splitlines()
    # Line 3 of the file becomes "seed: 1: 2": a mapping value where none is allowed.
    lines.insert(2, "seed: 1: 2")
    path = tmp_path / "broken.yaml"
    path.write_text("\n".join(lines) + "\n")
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"), path.name, "line 3")
    assert "YAML" in msg


def test_scenario_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "does-not-exist.yaml", "not found")


# ----- catalog errors -----------------------------------------------------------------------------------
def test_power_cap_outside_gpu_range(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: d["control"].__setitem__("power_cap_w", 50))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                       path.name, "control.power_cap_w", "50", "h100-sxm", "200-700")


def test_unknown_model(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: dep0(d).__setitem__("model", "no-such-model"))
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                             path.name, "deployments.0.model", "no-such-model")
    assert "mixtral-8x7b" in msg  # lists the catalog names to choose from


def test_unknown_gpu(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: dep0(d).__setitem__("gpu", "no-such-gpu"))
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                             path.name, "deployments.0.gpu", "no-such-gpu")
    assert "h100-sxm" in msg  # lists the catalog names to choose from


# ----- trace errors -------------------------------------------------------------------------------------
def _trace(path: str, fmt: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: dep0(d).__setitem__("workload", {"kind": "trace", "path": path, "format": fmt})


def test_missing_trace_file(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, _trace("nope.csv", "azure"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"),
                       path.name, "deployments.0.workload.path", "nope.csv", "not found")


def _bad_csv_row(tmp_path: Path) -> Path:
    (tmp_path / "bad.csv").write_text("arrival_s,prompt_tokens,output_tokens\n"
                                      "0.0,100,10\n"
                                      "0.5,x,10\n"  # line 3
                                      "1.0,100,10\n")
    return write_scenario(tmp_path, _trace("bad.csv", "csv"))


def test_malformed_csv_trace_row(tmp_path: Path) -> None:
    path = _bad_csv_row(tmp_path)
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "bad.csv", "line 3", "prompt_tokens")


def test_malformed_csv_trace_row_shows_the_bad_value(tmp_path: Path) -> None:
    path = _bad_csv_row(tmp_path)
    msg = assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "bad.csv", "line 3")
    assert "'x'" in msg and "nan" not in msg


def test_malformed_mooncake_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0, "input_length": 100, "output_length": 10}\n'
                                        '{"timestamp": 500, "input_length": 100, "output_len\n'  # line 2
                                        '{"timestamp": 900, "input_length": 100, "output_length": 10}\n')
    path = write_scenario(tmp_path, _trace("bad.jsonl", "mooncake"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "bad.jsonl", "line 2")


def test_mooncake_line_missing_a_key(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0, "input_length": 100, "output_length": 10}\n'
                                        '{"timestamp": 500, "input_length": 100}\n')  # line 2
    path = write_scenario(tmp_path, _trace("bad.jsonl", "mooncake"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "bad.jsonl", "line 2", "output_length")


def test_empty_trace_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    path = write_scenario(tmp_path, _trace("empty.csv", "csv"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "empty.csv")


# ----- --set --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "needle"), [
    ("deployments.5.replicas=4", "deployments.5"),  # no such list index
    ("duration_s.x=3", "duration_s"),  # through a scalar
    ("deployments.0.engine.max_num_seq=64", "deployments.0.engine.max_num_seq"),  # unknown field
    ("no_equals_sign", "no_equals_sign"),
])
def test_set_with_bad_path(tmp_path: Path, override: str, needle: str) -> None:
    path = write_scenario(tmp_path)
    assert_clean_error(pals("run", path, "--out", tmp_path / "out", "--set", override), needle)


def test_set_overrides_apply(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "out"
    r = pals("run", path, "--out", out, "--no-report", "--set", "control.power_cap_w=400",
             "--set", "deployments.0.replicas=4", "--set", "duration_s=5")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    # 4 replicas of a tensor-parallel-2 deployment.
    assert base()["deployments"][0]["parallelism"]["tensor"] == 2
    assert summary["totals"]["num_gpus"] == 8
    assert summary["totals"]["duration_s"] == pytest.approx(5.0)
    resolved = yaml.safe_load((out / "scenario.resolved.yaml").read_text())
    assert resolved["deployments"][0]["replicas"] == 4
    assert resolved["control"]["power_cap_w"] == 400
    assert resolved["duration_s"] == 5
    # The scenario file itself is not changed by --set.
    assert yaml.safe_load(path.read_text())["control"]["power_cap_w"] == 700


def test_failed_run_leaves_previous_outputs_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = write_scenario(tmp_path, name="good.yaml")
    assert pals("run", good, "--out", out, "--no-report").returncode == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert "summary.json" in before

    bad_cases = [
        write_scenario(tmp_path, lambda d: d["control"].__setitem__("power_cap_w", 50), name="bad_cap.yaml"),
        _bad_csv_row(tmp_path),  # fails only once the simulation reads the trace
    ]
    for bad in bad_cases:
        r = pals("run", bad, "--out", out)
        assert r.returncode == 2, r.stderr
        after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
        assert after == before, bad.name


# ----- other bad input that should get one message, not a traceback -------------------------------------
def test_message_with_square_brackets(tmp_path: Path) -> None:
    path = write_scenario(tmp_path, lambda d: dep0(d).__setitem__("gpu", "[/x]"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "deployments.0.gpu", "[/x]")


def test_scenario_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00name: x\n")
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "binary.yaml")


def test_out_is_a_file(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    out = tmp_path / "not-a-folder"
    out.write_text("keep me")
    assert_clean_error(pals("run", path, "--out", out, "--no-report"), "not-a-folder")
    assert out.read_text() == "keep me"


# ----- schema -------------------------------------------------------------------------------------------
def test_schema_is_json_with_deployments() -> None:
    r = pals("schema")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert "deployments" in s["properties"]
    assert "deployments" in s.get("required", [])
    assert "base_dir" not in s["properties"]  # set by the loader, not by users


# ----- found by a user's review: each once a traceback, a silent wrong result or a misleading message -----
def test_trace_count_beyond_any_context_is_refused(tmp_path: Path) -> None:
    # 1e30 once became a negative int64 and a "completed" one-token request.
    (tmp_path / "huge.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10\n1,100,1e30\n")
    path = write_scenario(tmp_path, _trace("huge.csv", "csv"))
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "huge.csv", "line 3", "output_tokens", "1e30")


@pytest.mark.parametrize(("override", "needle"), [
    ("duration_s=.inf", "duration_s"),
    ("deployments.0.workload.rate_per_s=.inf", "rate_per_s"),
    ("power.budget_w=.nan", "power.budget_w"),  # once taken as "no budget"
    ("deployments.0.workload={kind: gamma, rate_per_s: 1, cv: 1000, prompt_tokens: 10, output_tokens: 10}",
     "cv"),  # once an endless loop: the gaps underflow to 0
    ("control.policy=:Foo", "control.policy"),
    ("control.policy=.relative:Foo", "control.policy"),
    ("control.policy=no_such_module:Foo", "control.policy"),
    ("deployments.0.model={hidden_size: 4096, num_attention_heads: 0, num_hidden_layers: 2, vocab_size: 100}",
     "num_attention_heads"),
    ("deployments.0.model={hidden_size: x, num_attention_heads: 8, num_hidden_layers: 2, vocab_size: 100}",
     "hidden_size"),
])
def test_more_bad_fields_are_one_error_naming_the_file(tmp_path: Path, override: str, needle: str) -> None:
    path = write_scenario(tmp_path)
    assert_clean_error(pals("run", path, "--set", override, "--out", tmp_path / "out"), path.name, needle)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    path.write_text(path.read_text() + "seed: 7\n" if "seed:" in path.read_text() else
                    path.read_text() + "seed: 7\nseed: 8\n")
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), path.name, "duplicate key 'seed'")


def test_expert_counts_without_their_columns(tmp_path: Path) -> None:
    (tmp_path / "counts.csv").write_text("a,b\n1,2\n")

    def change(d: dict[str, Any]) -> None:
        dep0(d)["model"] = "mixtral-8x7b"
        dep0(d)["expert_routing"] = {"kind": "measured", "path": "counts.csv", "model": "mixtral-8x7b", "layer": 0}
    path = write_scenario(tmp_path, change)
    assert_clean_error(pals("run", path, "--out", tmp_path / "out"), "counts.csv", "missing column(s)",
                       "model, layer, expert, count")


def test_an_open_process_lasts_the_whole_duration(tmp_path: Path) -> None:
    # A Poisson process without a request limit goes on past its last drawn arrival: the run lasts duration_s
    # (idle draw included), not until the last request is served. With a limit it may end earlier.
    def slow(d: dict[str, Any]) -> None:
        d["duration_s"] = 60
        dep0(d)["workload"] = {"kind": "poisson", "rate_per_s": 0.05, "prompt_tokens": 100, "output_tokens": 10}
    path = write_scenario(tmp_path, slow)
    r = pals("run", path, "--out", tmp_path / "open", "--no-report")
    assert r.returncode == 0, r.stderr
    totals = json.loads((tmp_path / "open" / "summary.json").read_text())["totals"]
    assert totals["duration_s"] == pytest.approx(60.0)
    r = pals("run", path, "--set", "deployments.0.workload.requests=1", "--out", tmp_path / "one", "--no-report")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["totals"]["duration_s"] < 60.0


def test_resolved_scenario_reloads_to_the_same_run_from_anywhere(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10\n0.5,200,20\n1.0,50,5\n")
    path = write_scenario(tmp_path, _trace("t.csv", "csv"))
    assert pals("run", path, "--out", tmp_path / "a", "--no-report").returncode == 0
    elsewhere = tmp_path / "x" / "y"
    elsewhere.mkdir(parents=True)
    again = elsewhere / "copy.yaml"
    again.write_text((tmp_path / "a" / "scenario.resolved.yaml").read_text())  # moved: its paths must still hold
    r = pals("run", again, "--out", tmp_path / "b", "--no-report")
    assert r.returncode == 0, r.stderr
    a, b = (pd.read_parquet(tmp_path / d / "requests.parquet") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)


def test_no_report_removes_an_earlier_runs_report(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    assert pals("run", path, "--out", tmp_path / "o").returncode == 0
    assert (tmp_path / "o" / "report.html").is_file()
    assert pals("run", path, "--set", "seed=7", "--out", tmp_path / "o", "--no-report").returncode == 0
    assert not (tmp_path / "o" / "report.html").exists()  # it described the seed-42 results


def test_profile_and_calibrate_options(tmp_path: Path) -> None:
    path = write_scenario(tmp_path)
    table = tmp_path / "t.csv"
    table.write_text("x\n")
    # --out is a file path here, unlike pals run's folder
    assert_clean_error(pals("profile", "sim", path, "--caps", "300", "--batches", "8", "--out", tmp_path),
                       "is a folder")
    assert_clean_error(pals("profile", "sim", path, "--caps", "300", "--batches", "1.5", "--out", table),
                       "--batches", "whole numbers")
    assert_clean_error(pals("profile", "import", "pals-a100", table, "--out", tmp_path / "p.csv",
                            "--prompt-tokens-mean", "300"), "--prompt-tokens-mean", "only for mlenergy")
    assert_clean_error(pals("profile", "import", "argonne", table, "--out", tmp_path / "p.csv",
                            "--prompt-tokens-cv", "2"), "--prompt-tokens-cv", "only for mlenergy")
    assert_clean_error(pals("profile", "import", "mlenergy", tmp_path, "--out", tmp_path / "p.csv",
                            "--prompt-tokens-cv", "20"), "--prompt-tokens-cv 20", "from 0 to 10")
    assert_clean_error(pals("calibrate", table, "--applies-to", "foo"), "--applies-to", "'foo'", "h100-sxm")


def test_catalog_names_stay_whole_at_80_columns() -> None:
    r = subprocess.run([sys.executable, "-m", "sim.cli", "catalog"], capture_output=True, text=True, cwd=REPO,
                       env={**_env(), "COLUMNS": "80"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "a100-sxm4-40gb" in r.stdout and "a100-sxm4-80gb" in r.stdout
