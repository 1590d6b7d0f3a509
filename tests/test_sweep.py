"""`pals sweep`: spec expansion (exact order), derived budgets, errors, a real 2-worker Dask LocalCluster, failed
runs, SIGKILL + --resume, and results identical to running each scenario on its own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.run import run_scenario
from sim.scenario import load_scenario
from sim.sweep import results as results_module
from sim.sweep.execute import _sigint_held, dask_client, run_sweep
from sim.sweep.expand import load_sweep, scenario_key
from sim.sweep.results import METRIC_COLUMNS, RESULTS_FILE, ResultsTable
from sim.sweep.spec import SweepError

PALS = Path(sys.executable).with_name("pals")

# Two replicas of Llama-3.1-8B on one H100 each, Poisson chat traffic: a run takes a fraction of a second.
BASE = {
    "name": "sweep-tiny", "seed": 0, "duration_s": 20,
    "deployments": [{
        "name": "d", "model": "llama-3.1-8b", "gpu": "h100-sxm", "replicas": 2, "parallelism": {"tensor": 1},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 4096},
        "workload": {"kind": "poisson", "rate_per_s": 30, "prompt_tokens": 512, "output_tokens": 128},
        "slo": {"ttft_s": 1.0, "tpot_s": 0.05},
    }],
    "control": {"policy": "static", "period_s": 0.5},
}

# A user policy that raises in decide() after a few periods: its runs must be recorded as failed.
FAILING_POLICY = textwrap.dedent('''
    from sim.control import Action


    class Boom:
        def __init__(self, ctx):
            self.n = ctx.num_gpus
            self.calls = 0

        def decide(self, obs):
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("boom in decide at t=%.1f s" % obs.time_s)
            return Action((700.0,) * self.n, 64)
''')

# A user policy whose process dies in decide() (as a crash or the OOM killer would end it): the worker dies.
DYING_POLICY = textwrap.dedent('''
    import os

    from sim.control import Action


    class Die:
        def __init__(self, ctx):
            self.n = ctx.num_gpus
            self.calls = 0

        def decide(self, obs):
            self.calls += 1
            if self.calls == 4:
                os._exit(1)
            return Action((700.0,) * self.n, 64)
''')


def write_sweep(folder: Path, spec: dict, base: dict | None = None) -> Path:
    """The base scenario as base.yaml and the spec as sweep.yaml in ``folder``; returns the spec path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base or BASE, sort_keys=False))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **spec}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A folder holding the failing policy modules, importable by this process and by spawned Dask workers."""
    folder = tmp_path_factory.mktemp("policies")
    (folder / "sweep_boom_policy.py").write_text(FAILING_POLICY)
    (folder / "sweep_die_policy.py").write_text(DYING_POLICY)
    sys.path.insert(0, str(folder))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *([old] if old else [])])
    yield folder
    sys.path.remove(str(folder))
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def client(policy_dir):
    """A real 2-worker LocalCluster (processes, one thread each), shared by the tests of this module."""
    with dask_client(workers=2) as c:
        yield c


# ----- expansion ----------------------------------------------------------------------------------------
def test_expansion_order_grid_zip_seeds(tmp_path):
    spec = write_sweep(tmp_path, {
        "grid": {"control.policy": ["static", "pals"], "deployments.0.replicas": [1, 2]},
        "zip": [{"deployments.0.engine.max_num_seqs": [8, 16],
                 "deployments.0.engine.max_num_batched_tokens": [512, 1024]}],
        "seeds": [5, 6],
    })
    sweep = load_sweep(spec)
    got = [(r.params["control.policy"], r.params["deployments.0.replicas"],
            r.params["deployments.0.engine.max_num_seqs"], r.params["deployments.0.engine.max_num_batched_tokens"],
            r.seed) for r in sweep.runs]
    # Grid keys in file order (first outermost), then the zip group as one axis (8 with 512, 16 with 1024:
    # never crossed), seeds innermost.
    expected = [(p, n, s, t, seed) for p in ("static", "pals") for n in (1, 2) for s, t in ((8, 512), (16, 1024))
                for seed in (5, 6)]
    assert got == expected
    assert [r.index for r in sweep.runs] == list(range(16))
    # Each run's scenario carries its values (resolved and validated before anything runs).
    r = sweep.runs[13]  # pals, 2 replicas, (8, 512), seed 6
    assert (r.scenario.control.policy, r.scenario.deployments[0].replicas, r.scenario.seed) == ("pals", 2, 6)
    assert r.scenario.deployments[0].engine.max_num_seqs == 8
    assert r.overrides == ("control.policy=pals", "deployments.0.replicas=2", "deployments.0.engine.max_num_seqs=8",
                           "deployments.0.engine.max_num_batched_tokens=512", "seed=6")
    assert len({r.key for r in sweep.runs}) == 16
    # Keys are stable: expanding again gives the same hashes.
    assert [r.key for r in load_sweep(spec).runs] == [r.key for r in sweep.runs]


def test_no_seeds_uses_the_base_seed(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"grid": {"duration_s": [5, 10]}}))
    assert [(r.params["duration_s"], r.seed) for r in sweep.runs] == [(5, 0), (10, 0)]


def test_derived_budget_values_are_exact(tmp_path):
    # Peak = 2 replicas x 1 GPU x 700 W (the H100 SXM's max power limit) = 1,400 W.
    spec = write_sweep(tmp_path, {
        "grid": {"frac": [0.4, 0.7, 1.0]},
        "derived": {"power.budget_w": {"fraction_of_peak": "frac"},
                    "control.power_cap_w": {"fraction_of_gpu_max": "frac"}},
    })
    runs = load_sweep(spec).runs
    # 0.7 * 1400 is 979.9999999999999 in floating point; the derivation is exact on the decimals written.
    assert 0.7 * 1400 != 980.0
    assert [r.scenario.power.budget_w for r in runs] == [560.0, 980.0, 1400.0]
    assert [r.scenario.control.power_cap_w for r in runs] == [280.0, 490.0, 700.0]
    assert [r.peak_power_w for r in runs] == [1400.0] * 3
    assert runs[1].params == {"frac": 0.7, "power.budget_w": 980.0, "control.power_cap_w": 490.0}
    assert "frac" not in " ".join(runs[1].overrides)  # a variable, not a scenario field
    # Peak follows the other varied fields: 4 replicas -> 2,800 W.
    spec = write_sweep(tmp_path / "r", {"grid": {"deployments.0.replicas": [4]},
                                        "derived": {"power.budget_w": {"fraction_of_peak": 0.6}}})
    assert load_sweep(spec).runs[0].scenario.power.budget_w == 1680.0
    # On system power, peak = 1.05 x 1,400 W + 345 W for the one node = 1,815 W; half of it is 907.5 W.
    base = {**BASE, "power": {"budget_applies_to": "system"}}
    spec = write_sweep(tmp_path / "s", {"derived": {"power.budget_w": {"fraction_of_peak": 0.5}}}, base)
    run = load_sweep(spec).runs[0]
    assert (run.peak_power_w, run.scenario.power.budget_w) == (1815.0, 907.5)


@pytest.mark.parametrize(("spec", "message"), [
    ({"grdi": {"seed": [1]}}, "sweep.yaml: grdi: unknown field"),
    ({"grid": {"control.policy": []}}, "sweep.yaml: grid: control.policy: expected a non-empty list of values"),
    ({"zip": [{"duration_s": [5, 10], "seed_x": [1]}]},
     "sweep.yaml: zip: group 0: the lists of a zip group must have equal lengths (duration_s has 2, seed_x has 1)"),
    ({"grid": {"seed": [1, 2]}}, "sweep.yaml: grid: seed cannot be varied here (use seeds:)"),
    ({"seeds": [1, -2]}, "sweep.yaml: seeds.1: Input should be greater than or equal to 0 (got -2)"),
    ({"derived": {"power.budget_w": {"fraction_of_peak": "budget"}}},
     "sweep.yaml: derived.power.budget_w: fraction_of_peak: 'budget' is not a variable of grid or zip"),
    ({"grid": {"deployments.0.replicas": [1, 0]}},
     "sweep.yaml: run 1 (deployments.0.replicas=0, seed=0): deployments.0.replicas: Input should be greater than "
     "or equal to 1 (got 0)"),
    ({"grid": {"control.power_cap_w": [300, 50]}},
     "sweep.yaml: run 1 (control.power_cap_w=50, seed=0): control.power_cap_w: 50 W is outside h100-sxm's "
     "power-limit range 200-700 W"),
    ({"grid": {"control.policy": ["static", "greedy"]}},
     "sweep.yaml: run 1 (control.policy=greedy, seed=0): control.policy: unknown policy 'greedy'"),
    ({"grid": {"deployments.3.replicas": [2]}},
     "sweep.yaml: run 0 (deployments.3.replicas=2, seed=0): grid: deployments.3.replicas: not a field path of the "
     "base scenario"),
    ({"grid": {"f": [0.5, 0]}, "derived": {"power.budget_w": {"fraction_of_peak": "f"}}},
     "sweep.yaml: run 1 (f=0, seed=0): derived.power.budget_w: fraction_of_peak needs a positive number, got 0"),
    ({"derived": {"deployments.5.replicas": {"fraction_of_peak": 0.5}}},
     "sweep.yaml: run 0 (seed=0): derived.deployments.5.replicas: not a field path of the base scenario "
     "(deployments.5 is not an index of a list of 1)"),
])
def test_bad_spec_is_reported_with_file_and_field(tmp_path, spec, message):
    with pytest.raises(SweepError) as err:
        load_sweep(write_sweep(tmp_path, spec))
    text = str(err.value).replace(str(tmp_path) + "/", "")
    assert message in text


def test_two_runs_resolving_to_one_scenario_are_refused(tmp_path):
    # The scenario normalises a budget to float: 1000 and 1000.0 are one scenario, which would share a run key.
    spec = write_sweep(tmp_path, {"grid": {"power.budget_w": [1000, 1000.0]}})
    with pytest.raises(SweepError, match="resolves to the same scenario as run 0"):
        load_sweep(spec)


def test_cli_bad_spec_one_line_exit_2(tmp_path):
    spec = write_sweep(tmp_path, {"grid": {"deployments.0.replicas": [1, 0]}})
    proc = subprocess.run([str(PALS), "sweep", str(spec), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "sweep.yaml: run 1" in proc.stderr and "deployments.0.replicas" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_invalid_yaml_base_is_one_line_with_line_and_column(tmp_path):
    spec = write_sweep(tmp_path, {})
    (tmp_path / "base.yaml").write_text("name: x\ndeployments: [\n")
    with pytest.raises(SweepError) as err:
        load_sweep(spec)
    text = str(err.value)
    assert "\n" not in text and "<unicode string>" not in text
    assert text.startswith(f"{spec}: base: {tmp_path / 'base.yaml'}: line 3, column 1: invalid YAML: ")


def test_overrides_column_splits_back_into_set_arguments(tmp_path):
    # A mapping value (a token-length distribution) and a string with a space: each override must stay one
    # argument when the column is split like a shell command line.
    lognormal = {"dist": "lognormal", "median": 500, "sigma": 0.5, "max": 4096}
    spec = write_sweep(tmp_path, {"grid": {"deployments.0.workload.prompt_tokens": [512, lognormal],
                                           "name": ["sweep tiny"]}})
    sweep = load_sweep(spec)
    table = ResultsTable(sweep, tmp_path / RESULTS_FILE)
    for run in sweep.runs:
        table.record(run, {"status": "ok", "error": "", "wall_s": 0.1, "totals": None})
    df = pd.read_parquet(tmp_path / RESULTS_FILE)
    for run, text in zip(sweep.runs, df["overrides"], strict=True):
        args = shlex.split(text)
        assert args == list(run.overrides)
        assert scenario_key(load_scenario(tmp_path / "base.yaml", args)) == run.key


def test_zero_workers_refused():
    with pytest.raises(SweepError, match="--workers 0: expected at least 1"), dask_client(workers=0):
        pass


def test_a_ctrl_c_while_the_cluster_starts_is_held_not_lost():
    # Once SIGINT was ignored while the workers started: a Ctrl-C in that second was lost and the whole sweep ran.
    before = signal.getsignal(signal.SIGINT)
    with _sigint_held() as received:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs on the main thread at the next bytecode
        assert received == [signal.SIGINT]  # recorded; the caller raises KeyboardInterrupt once it can clean up
    assert signal.getsignal(signal.SIGINT) == before


def test_workers_ignore_ctrl_c_and_the_driver_stops_the_sweep():
    from sim.sweep.quiet import QuietOnCtrlC

    with dask_client(workers=1) as client:
        assert QuietOnCtrlC.name in client.run(lambda dask_worker: list(dask_worker.plugins)).popitem()[1]
        dispositions = client.run(lambda: str(signal.getsignal(signal.SIGINT)))
        assert set(dispositions.values()) == {str(signal.SIG_IGN)}


# ----- a sweep folder, without a cluster ------------------------------------------------------------------
def record_all(spec: Path, out: Path) -> None:
    """Record every run of ``spec`` in ``out/results.parquet`` with made-up metrics, as if the sweep had run."""
    sweep = load_sweep(spec)
    out.mkdir(parents=True)
    table = ResultsTable(sweep, out / RESULTS_FILE)
    for run in sweep.runs:
        table.record(run, {"status": "ok", "error": "", "wall_s": 0.1,
                           "totals": dict.fromkeys(METRIC_COLUMNS, float(run.index + 1))})


def test_report_with_null_budget_values(tmp_path):
    # power.budget_w: [null, 1000] is no budget axis (not all numbers): no heatmap, but a report, not a crash.
    spec = write_sweep(tmp_path, {"grid": {"control.policy": ["static", "pals"], "power.budget_w": [None, 1000]}})
    assert load_sweep(spec).budget_axis is None
    out = tmp_path / "out"
    record_all(spec, out)
    result = run_sweep(spec, out, resume=True)  # every run recorded: no cluster needed
    assert (result.total, result.ok, result.skipped) == (4, 4, 4)
    assert "Pareto front" in (out / "report.html").read_text()


def test_report_failure_is_one_error_and_keeps_the_results(tmp_path, monkeypatch):
    spec = write_sweep(tmp_path, {"seeds": [1, 2]})
    out = tmp_path / "out"
    record_all(spec, out)

    def broken(*_args: object) -> str:
        raise ValueError("bad figure")

    monkeypatch.setattr("sim.sweep.report.sweep_report", broken)
    with pytest.raises(SweepError) as err:
        run_sweep(spec, out, resume=True)
    assert str(err.value) == (f"{out / 'report.html'}: cannot make the report (ValueError: bad figure); the "
                              f"results are in {out / RESULTS_FILE}")
    assert len(pd.read_parquet(out / RESULTS_FILE)) == 2


def test_second_sweep_on_the_same_folder_is_refused(tmp_path):
    spec = write_sweep(tmp_path, {"seeds": [1, 2]})
    out = tmp_path / "out"
    record_all(spec, out)
    with open(out / ".lock", "a") as held:  # as a sweep running in the folder holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SweepError, match="another pals sweep is running in this folder"):
            run_sweep(spec, out, resume=True)
    run_sweep(spec, out, resume=True)  # released: goes on
    with open(out / ".lock", "a") as fh:  # and a finished sweep released it
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ----- running on Dask ----------------------------------------------------------------------------------
def test_sweep_on_local_cluster_records_failures_and_matches_single_runs(tmp_path, client, policy_dir):
    spec = write_sweep(tmp_path, {
        "grid": {"control.policy": ["static", "pals", "sweep_boom_policy:Boom"], "frac": [0.5, 1.0]},
        "seeds": [1, 2],
        "derived": {"power.budget_w": {"fraction_of_peak": "frac"},
                    "control.power_cap_w": {"fraction_of_gpu_max": "frac"}},
    })
    out = tmp_path / "out"
    result = run_sweep(spec, out, client=client)
    assert (result.total, result.ok, result.failed, result.skipped) == (12, 8, 4, 0)
    df = pd.read_parquet(out / "results.parquet")
    sweep = load_sweep(spec)
    assert list(df["run_index"]) == list(range(12))
    assert list(df["run_key"]) == [r.key for r in sweep.runs]
    failed = df[df["status"] == "failed"]
    assert list(failed["policy"]) == ["sweep_boom_policy:Boom"] * 4
    # decide() is called at t = 0, 0.5, 1.0, 1.5 s (every period_s): the 4th call raises.
    assert list(failed["error"]) == ["RuntimeError: boom in decide at t=1.5 s"] * 4
    assert failed["throughput_tokens_per_s"].isna().all()
    ok = df[df["status"] == "ok"]
    assert (ok["error"] == "").all() and (ok["wall_s"] > 0).all()
    # Every ok row equals the same resolved scenario run on its own, loaded like `pals run BASE --set ...`.
    for row in ok.itertuples():
        sc = load_scenario(tmp_path / "base.yaml", shlex.split(row.overrides))
        totals = run_scenario(sc).summary["totals"]
        for c in METRIC_COLUMNS:
            want, got = float(totals[c]), getattr(row, c)
            assert (math.isnan(want) and math.isnan(got)) or want == got, (row.run_index, c, want, got)
    # And the first ok run through the `pals run` command itself: the same totals in its summary.json.
    first = ok.iloc[0]
    cmd = [str(PALS), "run", str(tmp_path / "base.yaml"), "--no-report", "--out", str(tmp_path / "single")]
    for o in shlex.split(first["overrides"]):
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, capture_output=True)
    totals = json.loads((tmp_path / "single" / "summary.json").read_text())["totals"]
    assert all(totals[c] == first[c] or (totals[c] is None and math.isnan(first[c])) for c in METRIC_COLUMNS)
    # The budget binds at 50 %: static's 350 W cap costs throughput against static at 100 % (the reference).
    half = ok[(ok["frac"] == 0.5) & (ok["policy"] == "static")]["throughput_tokens_per_s"].to_numpy()
    full = ok[(ok["frac"] == 1.0) & (ok["policy"] == "static")]["throughput_tokens_per_s"].to_numpy()
    assert (half < full).all()
    report = (out / "report.html").read_text()
    assert "Pareto front" in report and "Failed runs" in report and "boom in decide" in report
    assert "<script src=\"http" not in report  # plotly inlined: the page works offline


def test_local_cluster_workers_ignore_sigint(client):
    # Ctrl-C reaches the driver alone (it cancels the runs and closes the cluster), not every worker.
    assert all(client.run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN).values())


def test_a_run_killing_its_worker_fails_alone(tmp_path, client, policy_dir):
    # The dying runs kill their workers (Dask retries each on new ones, then gives up); results of other runs
    # held by a worker that died are recomputed, never recorded as failed.
    spec = write_sweep(tmp_path, {"grid": {"control.policy": ["static", "sweep_die_policy:Die"]},
                                  "seeds": [1, 2]}, {**BASE, "duration_s": 5})
    out = tmp_path / "out"
    result = run_sweep(spec, out, client=client)
    df = pd.read_parquet(out / RESULTS_FILE)
    assert list(zip(df["policy"], df["status"], strict=True)) == [("static", "ok")] * 2 + [
        ("sweep_die_policy:Die", "failed")] * 2, df[["policy", "status", "error"]]
    assert all(e.startswith("worker process died: ") for e in df["error"][2:])
    assert (result.ok, result.failed) == (2, 2)


def test_resume_takes_indices_and_parameters_from_the_current_spec(tmp_path, client):
    base = {**BASE, "duration_s": 5}
    out = tmp_path / "out"
    spec = write_sweep(tmp_path, {"seeds": [1, 2, 3]}, base)
    run_sweep(spec, out, client=client)
    before = pd.read_parquet(out / RESULTS_FILE).set_index("seed")
    # (a) A seed added in front: the recorded runs move to indices 1-3, as in sweep.json.
    spec = write_sweep(tmp_path, {"seeds": [4, 1, 2, 3]}, base)
    result = run_sweep(spec, out, resume=True, client=client)
    assert (result.total, result.skipped, result.ok) == (4, 3, 4)
    df = pd.read_parquet(out / RESULTS_FILE)
    expansion = json.loads((out / "sweep.json").read_text())["expansion"]
    assert list(df["run_index"]) == [0, 1, 2, 3] and list(df["seed"]) == [4, 1, 2, 3]
    assert list(df["run_key"]) == [e["run_key"] for e in expansion]
    kept = df.set_index("seed").loc[[1, 2, 3]]
    pd.testing.assert_series_equal(kept["throughput_tokens_per_s"], before["throughput_tokens_per_s"])
    pd.testing.assert_series_equal(kept["wall_s"], before["wall_s"])
    # (b) A grid key added at the base's value (2 replicas: the same scenarios) and a new value: the new column
    # is filled in for the recorded runs too, and every row is written.
    spec = write_sweep(tmp_path, {"grid": {"deployments.0.replicas": [2, 1]}, "seeds": [4, 1, 2, 3]}, base)
    result = run_sweep(spec, out, resume=True, client=client)
    assert (result.total, result.skipped, result.ok) == (8, 4, 8)
    df = pd.read_parquet(out / RESULTS_FILE)
    assert list(df["run_index"]) == list(range(8))
    assert list(df["deployments.0.replicas"]) == [2, 2, 2, 2, 1, 1, 1, 1]
    assert df["deployments.0.replicas"].dtype == "int64"
    assert shlex.split(df["overrides"][1]) == ["deployments.0.replicas=2", "seed=1"]


def test_results_write_error_is_reported_as_such(tmp_path, client, monkeypatch):
    spec = write_sweep(tmp_path, {}, {**BASE, "duration_s": 5})
    out = tmp_path / "out"

    def full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results_module, "write_parquet_durable", full)
    with pytest.raises(SweepError) as err:
        run_sweep(spec, out, client=client)
    assert str(err.value).startswith(f"{out / RESULTS_FILE}: cannot write (No space left on device)")


@pytest.mark.parametrize("cut", ["connection", "client"])
def test_losing_the_scheduler_is_one_error_and_keeps_finished_runs(tmp_path, cut):
    # After the first run: the connection to the scheduler drops (the client reconnects, its tasks are
    # cancelled), or the client closes (as it does when it cannot reconnect). Either way: one error, and the
    # runs cut off are not recorded (as failed or otherwise), so --resume runs them.
    from distributed import Client, LocalCluster

    spec = write_sweep(tmp_path, {"seeds": [1, 2, 3, 4, 5, 6]}, {**BASE, "duration_s": 60})
    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as c:

        def cut_after_one_run(done: int, _failed: int, _running: int, _total: int) -> None:
            if done >= 1 and c.status == "running":
                if cut == "connection":
                    c.sync(c.scheduler_comm.comm.close)
                else:
                    c.close()

        with pytest.raises(SweepError) as err:
            run_sweep(spec, out, client=c, progress=cut_after_one_run)
    assert str(err.value).startswith("lost the Dask cluster after ")
    assert str(err.value).endswith(f"finished runs are in {out / RESULTS_FILE}: rerun with --resume")
    df = pd.read_parquet(out / RESULTS_FILE)
    assert 1 <= len(df) < 6 and (df["status"] == "ok").all()


def _rows(path: Path) -> int:
    try:
        return len(pd.read_parquet(path))
    except (OSError, ValueError):
        return 0


def test_sigkill_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    spec = write_sweep(tmp_path, {"grid": {"deployments.0.workload.rate_per_s": [20, 30, 40]},
                                  "seeds": [1, 2, 3, 4]}, {**BASE, "duration_s": 90})
    out = tmp_path / "out"
    results = out / "results.parquet"
    cmd = [str(PALS), "sweep", str(spec), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # a loaded CI machine may take long to start the cluster
        while _rows(results) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before it could be killed"
        assert _rows(results) >= 1, "the sweep recorded no run within 180 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its Dask workers, all at once, no clean-up
        proc.wait()
    before = pd.read_parquet(results)
    assert 1 <= len(before) < 12, len(before)
    # Without --resume the folder is refused.
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"({len(before)} already recorded)" in done.stdout
    after = pd.read_parquet(results)
    sweep = load_sweep(spec)
    assert list(after["run_key"]) == [r.key for r in sweep.runs]  # exactly one row per run, in order
    assert (after["status"] == "ok").all()
    kept = after.set_index("run_key").loc[before["run_key"]].reset_index()
    pd.testing.assert_frame_equal(kept[before.columns], before)  # the rows recorded before the kill, unchanged
    assert (out / "report.html").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no torn temporary file left behind
