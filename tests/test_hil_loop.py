"""End to end on the digital twin: ``pals twin`` as a real subprocess on a free port at 10x, and ``pals hil run``
(another subprocess) driving it with the ``pals`` controller through a power-budget step.

Checked: the outputs of ``pals run`` (same files, same columns), requests completed, the controller's caps
reaching the twin (its device endpoint shows them during the run) and restored after it, the cap in the
timeseries following the budget step, window power never above the cap in force; SIGTERM and SIGINT mid-run
(limits back, records on disk and readable); the NVML path (``--gpus 0``) with the driver mocked; a server
that is down or a bad ``--gpus`` (one ``error:`` line, exit 2, no traceback); garbage from the completions
server (dropped requests with reasons); ``pals hil validate`` and ``pals hil profile`` on the twin.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from aiohttp import web

from hil.limits import restored_power_limits
from hil.loop import HilError, run_hil
from hil.twin_gpu import open_twin_gpus
from sim.control import Action, ControllerContext, Observation
from sim.metrics import REQUEST_COLUMNS
from sim.plant import TIMESERIES_COLUMNS
from sim.profile import read_table
from sim.scenario import load_scenario
from tests.test_hil_engine import free_port

REPO = Path(__file__).resolve().parents[1]
SPEEDUP = 10.0
DEFAULT_LIMIT_MW = 700_000  # h100-sxm
LOW_BUDGET_W = 300.0
# Window power may exceed the cap in force by at most this share: the twin's energy counter and clock are
# exact, and both come from one reading of its device endpoint; what is left is NVML-unit rounding (integer
# mJ over windows of ~1 s of simulated time: < 0.01 %) and the cap's actuation inside a window, which the test
# excludes by looking only at windows whose cap was already in force at the previous reading.
POWER_TOLERANCE = 0.01

SCENARIO = {
    "name": "hil-e2e", "seed": 7, "duration_s": 20,
    "deployments": [{
        "name": "chat", "model": "llama-3.1-8b", "gpu": "h100-sxm", "engine": {"max_num_seqs": 64},
        "workload": {"kind": "poisson", "rate_per_s": 4,
                     "prompt_tokens": {"dist": "lognormal", "median": 256, "sigma": 0.5, "max": 2048},
                     "output_tokens": {"dist": "lognormal", "median": 64, "sigma": 0.5, "max": 256}},
    }],
    "power": {"budget_w": [{"at_s": 0, "w": 700}, {"at_s": 10, "w": LOW_BUDGET_W}]},
    "control": {"policy": "pals", "period_s": 1.0},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("FORCE_COLOR", "PY_COLORS", "CLICOLOR_FORCE"):
        env.pop(k, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def pals(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sim.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=timeout)


def pals_popen(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sim.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())


def devices(url: str) -> list[dict]:
    return httpx.get(f"{url}/nvml/devices", timeout=5).json()["devices"]


@pytest.fixture(scope="module")
def scenario_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hil") / "scenario.yaml"
    path.write_text(yaml.safe_dump(SCENARIO, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def twin(scenario_path: Path) -> Iterator[str]:
    """``pals twin`` on a free port at 10x; its base URL."""
    proc = pals_popen("twin", scenario_path, "--port", "0", "--speedup", str(SPEEDUP))
    url = None
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("serving on "):
            url = line.split()[2]
            break
    if url is None:
        proc.kill()
        pytest.fail(f"pals twin did not start: {proc.stderr.read() if proc.stderr else ''}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def finished_run(twin: str, scenario_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One complete ``pals hil run`` on the twin, with the device limits polled while it ran."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = pals_popen("hil", "run", scenario_path, "--endpoint", twin, "--gpus", "twin", "--out", out)
    limits_seen: set[int] = set()
    while proc.poll() is None:
        limits_seen.update(d["power_limit_mw"] for d in devices(twin))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    return {"out": out, "rc": proc.returncode, "stdout": stdout, "stderr": stderr, "limits_seen": limits_seen,
            "limits_after": [d["power_limit_mw"] for d in devices(twin)]}


def test_hil_run_writes_the_outputs_of_pals_run(finished_run: dict) -> None:
    assert finished_run["rc"] == 0, finished_run["stderr"]
    out: Path = finished_run["out"]
    for name in ("scenario.resolved.yaml", "requests.parquet", "timeseries.parquet", "summary.json",
                 "report.html", "token_times.parquet"):
        assert (out / name).is_file(), name
    requests = pd.read_parquet(out / "requests.parquet")
    timeseries = pd.read_parquet(out / "timeseries.parquet")
    assert tuple(requests.columns) == REQUEST_COLUMNS
    assert tuple(timeseries.columns) == TIMESERIES_COLUMNS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hil"]["complete"] is True and summary["hil"]["speedup"] == SPEEDUP
    done = requests[requests["status"] == "completed"]
    assert len(done) >= 0.8 * len(requests) > 40
    assert (done["generated_tokens"] == done["output_tokens"]).all()
    assert (done["first_token_s"] >= done["arrival_s"]).all() and (done["finish_s"] >= done["first_token_s"]).all()
    assert summary["totals"]["output_tokens"] >= done["generated_tokens"].sum()
    assert 15.0 < summary["totals"]["duration_s"] <= 21.0  # scenario seconds (2 s of wall time at 10x)
    # The same request ids, arrival order and token counts as the simulator's workload for this scenario.
    from hil.loadgen import planned_requests

    planned = planned_requests(load_scenario(out / "scenario.resolved.yaml"))
    assert list(requests["request_id"]) == [r.id for r in planned]
    assert list(requests["output_tokens"]) == [r.output_tokens for r in planned]
    tokens = pd.read_parquet(out / "token_times.parquet")
    assert len(tokens) == summary["totals"]["output_tokens"]  # every streamed token has its time
    per_request = tokens.groupby("request_id")["token"].count()
    assert (per_request.loc[done["request_id"]].to_numpy() == done["generated_tokens"].to_numpy()).all()
    # Inter-token latency over every streamed token: the gaps between each request's successive tokens.
    gaps = tokens.sort_values(["request_id", "token"]).groupby("request_id")["time_s"].diff().dropna().to_numpy()
    assert len(gaps) > 100
    assert summary["totals"]["itl_p50_s"] == pytest.approx(float(np.quantile(gaps, 0.5, method="inverted_cdf")))
    assert summary["totals"]["itl_p99_s"] == pytest.approx(float(np.quantile(gaps, 0.99, method="inverted_cdf")))


def test_controller_caps_reach_the_twin_and_are_restored(finished_run: dict) -> None:
    assert finished_run["rc"] == 0, finished_run["stderr"]
    assert int(LOW_BUDGET_W * 1000) in finished_run["limits_seen"]  # pals caps at the budget share after the step
    assert finished_run["limits_after"] == [DEFAULT_LIMIT_MW]  # restored when the run ended


def test_cap_follows_the_budget_step_and_power_stays_under_it(finished_run: dict) -> None:
    ts = pd.read_parquet(finished_run["out"] / "timeseries.parquet").sort_values("time_s").reset_index(drop=True)
    before = ts[ts["time_s"] <= 9.5]
    decision = int(ts.index[ts["time_s"] > 10.0][0])  # the first reading after the step: the controller acts
    after = ts.iloc[decision + 1:]  # ... and its cap is in force by the next reading (0.1 s actuation delay)
    assert (before["budget_w"] == 700).all() and (after["budget_w"] == LOW_BUDGET_W).all()
    assert before["power_cap_w"].min() > LOW_BUDGET_W  # the step changed the cap ...
    assert (after["power_cap_w"] <= LOW_BUDGET_W).all()  # ... down to the new share
    held = ts["power_cap_w"] == ts["power_cap_w"].shift(1)  # cap already in force at the previous reading
    checked = ts[held]
    assert len(checked) >= 10
    assert (checked["power_w"] <= checked["power_cap_w"] * (1 + POWER_TOLERANCE)).all(), checked[
        ["time_s", "power_w", "power_cap_w"]]
    assert (ts["power_w"] > 0).all() and ts["throughput_tokens_per_s"].max() > 0
    summary = json.loads((finished_run["out"] / "summary.json").read_text())
    assert summary["totals"]["budget_violation_fraction"] <= 0.1


def test_hil_validate_reports_finite_errors(finished_run: dict) -> None:
    out: Path = finished_run["out"]
    res = pals("hil", "validate", out)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    for label in ("output tokens/s", "avg GPU power (W)", "tokens/J", "GPU utilization", "TTFT p99 (s)",
                  "TPOT p50 (s)", "ITL p50 (s)"):
        assert label in res.stdout
    record = json.loads((out / "hil_validation.json").read_text())
    assert set(record["metrics"]) == {"throughput_tokens_per_s", "avg_power_w", "energy_j", "tokens_per_j",
                                      "gpu_utilization", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                                      "itl_p50_s", "itl_p99_s"}
    # Its NVML-style utilization, read at each window's end over the last simulated second, is the simulated
    # kernel share of the run within sampling (0.746 read against 0.749 simulated here).
    assert 0.3 < record["metrics"]["gpu_utilization"]["measured"] < 1.0
    assert abs(record["metrics"]["gpu_utilization"]["error"]) < 0.05
    for m in record["metrics"].values():
        assert m["error"] is not None and math.isfinite(m["error"])
    # The twin is the simulator: throughput over the same requests agrees closely.
    assert abs(record["metrics"]["throughput_tokens_per_s"]["error"]) < 0.15
    assert (out / "hil_validation.html").is_file() and (out / "simulated" / "summary.json").is_file()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_mid_run_restores_limits_and_keeps_the_records(twin: str, scenario_path: Path, tmp_path: Path,
                                                              sig: signal.Signals, code: int) -> None:
    out = tmp_path / "interrupted"
    proc = pals_popen("hil", "run", scenario_path, "--endpoint", twin, "--gpus", "twin", "--out", out,
                      "--duration-s", "600", "--set", f"power.budget_w={LOW_BUDGET_W}", "--flush-every-s", "0.5")
    deadline = time.monotonic() + 60
    capped = False
    while time.monotonic() < deadline and proc.poll() is None:
        capped = capped or devices(twin)[0]["power_limit_mw"] == int(LOW_BUDGET_W * 1000)
        if capped and (out / "summary.json").is_file():
            time.sleep(1.5)  # let some requests complete and a few snapshots land
            break
        time.sleep(0.05)
    assert capped and proc.poll() is None, proc.communicate()[1] if proc.poll() is not None else "not capped"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and sig.name in stderr
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hil"]["interrupted_by"] == sig.name and summary["hil"]["complete"] is False
    requests = pd.read_parquet(out / "requests.parquet")
    timeseries = pd.read_parquet(out / "timeseries.parquet")
    assert (requests["status"] == "completed").sum() > 5 and len(timeseries) > 5
    assert summary["totals"]["duration_s"] < 600
    unfinished = requests[requests["status"] == "dropped"]
    assert unfinished["drop_reason"].str.startswith("unfinished").all()


@pytest.mark.parametrize(("args", "message"), [
    (["--endpoint", "http://127.0.0.1:{port}", "--gpus", "twin"], "cannot reach the twin at"),
    (["--endpoint", "http://127.0.0.1:{port}", "--gpus", "zero,one"], "expected comma-separated GPU indices"),
    (["--endpoint", "http://127.0.0.1:{port}", "--gpus", "0"], ""),  # no NVML here, or no server: clear either way
    (["--endpoint", "http://127.0.0.1:abc", "--gpus", "twin"], "--endpoint 'http://127.0.0.1:abc'"),  # bad port
    (["--endpoint", "http://[::1", "--gpus", "twin"], "expected an http:// or https:// URL with a host"),
])
def test_server_down_or_bad_gpus_is_one_error_line(scenario_path: Path, args: list[str], message: str,
                                                   tmp_path: Path) -> None:
    port = free_port()
    res = pals("hil", "run", scenario_path, *[a.format(port=port) for a in args], "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert message in res.stderr


def test_two_deployments_are_refused(twin: str, scenario_path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(scenario_path.read_text())
    data["deployments"].append({**data["deployments"][0], "name": "other"})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    res = pals("hil", "run", path, "--endpoint", twin, "--gpus", "twin", "--out", tmp_path / "o")
    assert res.returncode == 2 and "drives one deployment" in res.stderr and "Traceback" not in res.stderr
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]


class _GarbageServer:
    """A completions server that answers garbage, in a thread of its own (the plant runs its own loop)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = 0  # the system picks a free one when the site starts
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _models(self, _r: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "llama-3.1-8b", "max_model_len": 131072}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if self.kind == "http500":
            return web.Response(status=500, text="Internal Server Error")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {\"choices\": [{\"text\": \"x\"}]}\n\ndata: {{{garbage\n\n")
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        self.port = self.runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize(("kind", "reason"), [("http500", "http 500: "), ("broken_sse", "bad response: non-JSON")])
def test_garbage_server_gives_dropped_requests_with_reasons(twin: str, scenario_path: Path, tmp_path: Path,
                                                            kind: str, reason: str) -> None:
    sc = load_scenario(scenario_path, ["duration_s=6"])
    gpus = open_twin_gpus(twin)
    with _GarbageServer(kind) as url:
        outcome = run_hil(sc, gpus, url, tmp_path / kind, speedup=SPEEDUP, guard=restored_power_limits,
                          report=False)
    requests = pd.read_parquet(tmp_path / kind / "requests.parquet")
    assert len(requests) > 5 and (requests["status"] == "dropped").all()
    settled = requests[~requests["drop_reason"].str.startswith("unfinished")]
    assert len(settled) > 5 and settled["drop_reason"].str.startswith(reason).all()
    assert outcome.summary["totals"]["requests_completed"] == 0
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]


def test_hil_profile_on_the_twin(twin: str, scenario_path: Path, tmp_path: Path) -> None:
    table_path = tmp_path / "profile.csv"
    res = pals("hil", "profile", "--endpoint", twin, "--gpus", "twin", "--caps", "250,700", "--batches", "8",
               "--scenario", scenario_path, "--window-s", "4", "--warmup-s", "1", "--out", table_path)
    assert res.returncode == 0, res.stderr
    table = read_table(table_path)
    assert list(table["source"]) == ["hil", "hil"] and list(table["power_cap_w"]) == [250.0, 700.0]
    assert (table["model"] == "llama-3.1-8b").all() and (table["gpu"] == "h100-sxm").all()
    assert (table["throughput_tokens_per_s"] > 0).all()
    # Inter-token latency from the streamed tokens' gaps, as a serving benchmark measures it.
    assert (table["itl_median_s"] > 0).all() and (table["itl_p99_s"] >= table["itl_median_s"]).all()
    # Utilization sampled through the window: kernels run most of a saturated step, the host waits the rest.
    assert table["gpu_busy_fraction"].between(0.3, 1.0, inclusive="right").all()
    # Under the lower cap kernels slow down and the host's share shrinks (PALS A100: 82.6 -> 95.7 % for OLMoE).
    assert table["gpu_busy_fraction"].iloc[0] > table["gpu_busy_fraction"].iloc[1]
    low = table[table["power_cap_w"] == 250.0].iloc[0]
    assert low["power_w_per_gpu"] <= 250.0 * (1 + POWER_TOLERANCE)
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]


@pytest.mark.parametrize("root", [True, False], ids=["root", "not-root"])
def test_nvml_gpus_drive_the_same_loop(twin: str, scenario_path: Path, tmp_path: Path, root: bool) -> None:
    """``--gpus 0``: NvmlGpu with the NVIDIA driver mocked (pynvml autospecced, a device drawing 250 W), the twin
    as the completions server. Power comes from the energy counter over NVML's monotonic clock, limits go out
    in mW, the controller's cap reaches the device and the original limit is put back. Without root every
    limit is refused: the run goes on at the limit in force, reports the refusal once, and ends with nothing to
    restore."""
    from unittest import mock

    import pynvml

    from hil.devices import open_gpus

    limit_mw = [700_000]
    set_calls: list[int] = []

    def set_limit(_handle: object, mw: int) -> None:
        set_calls.append(mw)
        if not root:
            pynvml.NVMLError._errcode_to_string.setdefault(pynvml.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions")
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        limit_mw[0] = mw

    answers = {
        "nvmlInit": None, "nvmlShutdown": None, "nvmlDeviceGetCount": 1, "nvmlDeviceGetHandleByIndex": object(),
        "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3", "nvmlDeviceGetPowerUsage": 250_000,
        "nvmlDeviceGetPowerManagementLimitConstraints": [200_000, 700_000],
        "nvmlDeviceGetPowerManagementDefaultLimit": 700_000, "nvmlDeviceGetClockInfo": 1980,
        "nvmlDeviceGetUtilizationRates": pynvml.c_nvmlUtilization_t(gpu=50, memory=10),
    }
    effects = {
        "nvmlDeviceGetTotalEnergyConsumption": lambda _h: int(250_000 * time.monotonic()),  # 250 W, in mJ
        "nvmlDeviceGetPowerManagementLimit": lambda _h: limit_mw[0],
        "nvmlDeviceGetEnforcedPowerLimit": lambda _h: limit_mw[0],
        "nvmlDeviceSetPowerManagementLimit": set_limit,
    }
    names = {**answers, **effects}
    with mock.patch.multiple(pynvml, **{n: mock.DEFAULT for n in names}, autospec=True) as mocks:
        for n, v in answers.items():
            mocks[n].return_value = v
        for n, f in effects.items():
            mocks[n].side_effect = f
        sc = load_scenario(scenario_path, ["duration_s=2.5", "control.period_s=0.5", f"power.budget_w={LOW_BUDGET_W}"])
        devs = open_gpus("0", twin)
        assert devs.speedup == 1.0
        outcome = run_hil(sc, devs.gpus, twin, tmp_path / "nvml", speedup=devs.speedup, guard=devs.guard,
                          report=False)
        for g in devs.gpus:
            g.close()
    # The controller's cap, then the original back; without root the refused cap changed nothing, so nothing is
    # set back (and no false "could not restore" error).
    assert set_calls == ([int(LOW_BUDGET_W * 1000), 700_000] if root else [int(LOW_BUDGET_W * 1000)])
    assert outcome.restore_failures == []
    ts = pd.read_parquet(tmp_path / "nvml" / "timeseries.parquet")
    assert len(ts) >= 4 and (ts["power_cap_w"] == (LOW_BUDGET_W if root else 700.0)).all() and (ts["gpu"] == 0).all()
    refusals = outcome.summary["hil"]["actuation_errors"]
    assert refusals == [] if root else (len(refusals) == 1 and "root" in refusals[0])
    assert ts["power_w"].to_numpy() == pytest.approx(250.0, rel=1e-3)
    assert (ts["clock_mhz"] == 1980).all() and (ts["utilization"] == 0.5).all()
    assert outcome.summary["totals"]["requests_completed"] > 3
    assert outcome.summary["hil"]["gpu_names"] == ["NVIDIA H100 80GB HBM3"]


class ExplodingPolicy:
    """A user policy with a bug: fine for three periods, then raises."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.n = ctx.num_gpus
        self.calls = 0

    def decide(self, obs: Observation) -> Action:
        """250 W and 8 in flight, until the fourth call."""
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("policy bug")
        return Action(tuple([250.0] * self.n), 8)


def test_a_failing_policy_stops_the_run_and_keeps_the_records(twin: str, scenario_path: Path,
                                                              tmp_path: Path) -> None:
    sc = load_scenario(scenario_path, ["control.policy=tests.test_hil_loop:ExplodingPolicy"])
    with pytest.raises(HilError, match="policy bug"):
        run_hil(sc, open_twin_gpus(twin), twin, tmp_path / "x", speedup=SPEEDUP, guard=restored_power_limits,
                report=False)
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]
    summary = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert summary["hil"]["complete"] is False and "policy bug" in summary["hil"]["error"]
    ts = pd.read_parquet(tmp_path / "x" / "timeseries.parquet")
    assert len(ts) >= 3 and (ts["power_cap_w"].iloc[1:] == 250.0).all() and (ts["max_num_seqs"] == 8).all()
    assert summary["totals"]["duration_s"] < 10


class BrokenPolicy(ExplodingPolicy):
    """A user policy that raises on its very first decision (before any window)."""

    def decide(self, obs: Observation) -> Action:
        """Always raises."""
        raise RuntimeError("policy bug at t=0")


def test_a_policy_failing_at_once_is_one_error_line(twin: str, scenario_path: Path, tmp_path: Path) -> None:
    res = pals("hil", "run", scenario_path, "--set", "control.policy=tests.test_hil_loop:BrokenPolicy",
               "--endpoint", twin, "--gpus", "twin", "--out", tmp_path / "b")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert "failed on its first decision" in res.stderr and "policy bug at t=0" in res.stderr
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]


def test_a_user_policy_runs_unchanged_on_the_twin(twin: str, scenario_path: Path, tmp_path: Path) -> None:
    """The alternating-cap policy of the simulator's tests, loaded by dotted path, drives the twin's device."""
    sc = load_scenario(scenario_path, ["duration_s=8", "control.policy=tests.userpolicy:AlternatingCap",
                                       "control.params={low: 300, high: 600, every: 2, max_num_seqs: 16}"])
    outcome = run_hil(sc, open_twin_gpus(twin), twin, tmp_path / "u", speedup=SPEEDUP, guard=restored_power_limits,
                      report=False)
    ts = pd.read_parquet(tmp_path / "u" / "timeseries.parquet")
    assert set(ts["power_cap_w"].iloc[1:]) == {300.0, 600.0} and (ts["max_num_seqs"] == 16).all()
    assert outcome.summary["hil"]["max_in_flight"] <= 16
    assert [d["power_limit_mw"] for d in devices(twin)] == [DEFAULT_LIMIT_MW]


class UnreachableAtTheEnd:
    """A limits guard whose GPU cannot be reached when the run ends (the twin died, the driver fell over)."""

    def __init__(self, gpus: list) -> None:
        self.failures: list[tuple[int, str]] = []

    def __enter__(self) -> UnreachableAtTheEnd:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.failures.append((0, "cannot reach the twin"))


def test_a_failed_restore_is_reported_not_hidden(twin: str, scenario_path: Path, tmp_path: Path) -> None:
    sc = load_scenario(scenario_path, ["duration_s=3"])
    outcome = run_hil(sc, open_twin_gpus(twin), twin, tmp_path / "f", speedup=SPEEDUP, guard=UnreachableAtTheEnd,
                      report=False)
    assert outcome.restore_failures == [(0, "cannot reach the twin")]
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["hil"]["power_limits_not_restored"] == [{"gpu": 0, "error": "cannot reach the twin"}]
