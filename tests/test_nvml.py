"""``NvmlGpu`` against an autospecced ``pynvml`` (no driver here: the only mocks of the project), the
power-limit guard of ``hil.limits`` on real ``Gpu`` implementations, and read-only checks on a real GPU
(``@pytest.mark.gpu``, skipped where NVML cannot initialise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pynvml
import pytest
import simpy

from hil import nvml
from hil.limits import PowerLimitGuard, limits_note, restored_power_limits
from hil.nvml import (
    EnergySample,
    NvmlGpu,
    NvmlGpuLostError,
    NvmlInvalidIndexError,
    NvmlNotSupportedError,
    NvmlPermissionError,
    NvmlUnavailableError,
    average_power_w,
    open_nvml_gpus,
)
from sim.catalog.gpus import get_gpu
from sim.gpu import Gpu, GpuError, SimGpu

ROOT = Path(__file__).resolve().parents[1]
HANDLE = object()  # what nvmlDeviceGetHandleByIndex returns: opaque to us


@pytest.fixture
def fake_nvml() -> Iterator[dict[str, mock.MagicMock]]:
    """Every pynvml function NvmlGpu calls, autospecced, answering like an H100 (values in NVML's mW / mJ)."""
    answers = {
        "nvmlInit": None,
        "nvmlShutdown": None,
        "nvmlDeviceGetCount": 2,
        "nvmlDeviceGetHandleByIndex": HANDLE,
        "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetPowerUsage": 312_345,
        "nvmlDeviceGetTotalEnergyConsumption": 98_765_432,
        "nvmlDeviceGetPowerManagementLimit": 700_000,
        "nvmlDeviceGetEnforcedPowerLimit": 700_000,
        "nvmlDeviceGetPowerManagementLimitConstraints": [200_000, 700_000],
        "nvmlDeviceGetPowerManagementDefaultLimit": 700_000,
        "nvmlDeviceSetPowerManagementLimit": None,
        "nvmlDeviceGetClockInfo": 1980,
        "nvmlDeviceGetUtilizationRates": pynvml.c_nvmlUtilization_t(gpu=37, memory=12),
    }
    with mock.patch.multiple(pynvml, **{name: mock.DEFAULT for name in answers}, autospec=True) as mocks:
        for name, value in answers.items():
            mocks[name].return_value = value
        yield mocks
    assert nvml._init_count == 0, "every NvmlGpu opened by a test must be closed"


def nvml_error(code: int) -> pynvml.NVMLError:
    """A real NVML exception (the error-string lookup needs no driver once cached)."""
    pynvml.NVMLError._errcode_to_string.setdefault(code, f"NVML error {code}")
    return pynvml.NVMLError(code)


def test_units_are_converted_at_the_boundary(fake_nvml: dict[str, mock.MagicMock]) -> None:
    gpu = NvmlGpu(1)
    try:
        assert isinstance(gpu, Gpu) and gpu.index == 1 and gpu.name == "NVIDIA H100 80GB HBM3"
        fake_nvml["nvmlDeviceGetHandleByIndex"].assert_called_once_with(1)
        assert gpu.get_power_w() == 312.345  # mW -> W
        assert gpu.get_total_energy_j() == 98_765.432  # mJ -> J
        assert gpu.get_power_limit_w() == 700.0
        assert gpu.get_power_limit_range_w() == (200.0, 700.0)
        assert gpu.get_default_power_limit_w() == 700.0
        assert gpu.get_sm_clock_mhz() == 1980.0
        fake_nvml["nvmlDeviceGetClockInfo"].assert_called_with(HANDLE, pynvml.NVML_CLOCK_SM)
        assert gpu.get_utilization() == 0.37  # percent -> fraction
        assert gpu.set_power_limit_w(412.5) == 412.5
        fake_nvml["nvmlDeviceSetPowerManagementLimit"].assert_called_with(HANDLE, 412_500)  # W -> mW
    finally:
        gpu.close()
    fake_nvml["nvmlInit"].assert_called_once_with()
    fake_nvml["nvmlShutdown"].assert_called_once_with()


def test_limits_are_clamped_to_the_constraints(fake_nvml: dict[str, mock.MagicMock],
                                               caplog: pytest.LogCaptureFixture) -> None:
    gpu = NvmlGpu(0)
    try:
        setter = fake_nvml["nvmlDeviceSetPowerManagementLimit"]
        assert gpu.set_power_limit_w(50.0) == 200.0  # below the 200 W floor
        setter.assert_called_with(HANDLE, 200_000)
        assert gpu.set_power_limit_w(900.0) == 700.0  # above the 700 W ceiling
        setter.assert_called_with(HANDLE, 700_000)
        assert "clamped to 700.0 W" in caplog.text
    finally:
        gpu.close()


def test_average_power_from_the_energy_counter(fake_nvml: dict[str, mock.MagicMock]) -> None:
    # 300 J over 2 s is 150 W, whatever the instantaneous readings were.
    assert average_power_w(EnergySample(10.0, 1_000.0), EnergySample(12.0, 1_300.0)) == 150.0
    with pytest.raises(ValueError, match="positive duration"):
        average_power_w(EnergySample(1.0, 0.0), EnergySample(1.0, 5.0))
    gpu = NvmlGpu(0)
    try:
        start = gpu.energy_sample()
        assert start.energy_j == 98_765.432
        fake_nvml["nvmlDeviceGetTotalEnergyConsumption"].return_value = 98_765_432 + 50_000  # +50 J
        time.sleep(0.05)
        power_w = gpu.average_power_w(start)
        elapsed_s = time.monotonic() - start.time_s
        assert 50.0 / elapsed_s <= power_w <= 50.0 / 0.05
    finally:
        gpu.close()


@pytest.mark.parametrize(("code", "error", "words"), [
    (pynvml.NVML_ERROR_NO_PERMISSION, NvmlPermissionError,
     "setting power limits needs root: run as root (e.g. `sudo -E .venv/bin/pals hil ...`) or grant the process "
     "CAP_SYS_ADMIN"),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, NvmlNotSupportedError, "not supported"),
    (pynvml.NVML_ERROR_GPU_IS_LOST, NvmlGpuLostError, "the GPU is lost"),
    (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, NvmlUnavailableError, "reboot or reload the nvidia kernel modules"),
    # A driver too old for one call is not a missing driver: the other calls work.
    (pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, NvmlNotSupportedError, "the driver is older than this call needs"),
])
def test_nvml_errors_are_translated(fake_nvml: dict[str, mock.MagicMock], code: int, error: type,
                                    words: str) -> None:
    gpu = NvmlGpu(0)
    try:
        fake_nvml["nvmlDeviceSetPowerManagementLimit"].side_effect = nvml_error(code)
        with pytest.raises(error) as info:
            gpu.set_power_limit_w(300.0)
        assert isinstance(info.value, GpuError)
        assert words in str(info.value) and "GPU 0" in str(info.value)
    finally:
        gpu.close()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_no_driver_says_so(fake_nvml: dict[str, mock.MagicMock], code: int) -> None:
    fake_nvml["nvmlInit"].side_effect = nvml_error(code)
    with pytest.raises(NvmlUnavailableError, match="no NVIDIA driver / NVML library found"):
        NvmlGpu(0)
    fake_nvml["nvmlShutdown"].assert_not_called()  # nothing was initialised


def test_invalid_index(fake_nvml: dict[str, mock.MagicMock]) -> None:
    with pytest.raises(NvmlInvalidIndexError, match=r"no GPU 5: NVML sees 2 GPU\(s\) \(indices 0-1\)"):
        NvmlGpu(5)
    fake_nvml["nvmlShutdown"].assert_called_once_with()  # the failed open released NVML


def test_open_by_index_list_closes_all_if_one_fails(fake_nvml: dict[str, mock.MagicMock]) -> None:
    gpus = open_nvml_gpus([1, 0])
    assert [g.index for g in gpus] == [1, 0]
    for g in gpus:
        g.close()
    every = open_nvml_gpus(None)  # every GPU NVML sees
    assert [g.index for g in every] == [0, 1]
    for g in every:
        g.close()
    with pytest.raises(NvmlInvalidIndexError, match="no GPU 3"):
        open_nvml_gpus([0, 3])
    with pytest.raises(NvmlInvalidIndexError, match="repeat"):
        open_nvml_gpus([0, 0])
    # The failed lists released the GPUs they had opened (GPU 0): nothing holds NVML.
    assert nvml._init_count == 0


# ----- hil.limits on real Gpu implementations -------------------------------------------------------------
def sim_gpus(n: int = 3) -> list[SimGpu]:
    """Simulated GPUs whose limits apply at once (no actuation delay)."""
    env = simpy.Environment()
    return [SimGpu(env, get_gpu("h100-sxm"), i, actuation_delay_s=0.0) for i in range(n)]


class BrokenGpu(SimGpu):
    """A GPU that fell off the bus after the guard recorded its limit: every later change fails."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lost = False

    def set_power_limit_w(self, power_w: float) -> None:
        if self.lost:
            raise GpuError(f"GPU {self.index}: the GPU is lost")
        super().set_power_limit_w(power_w)


def test_guard_restores_on_normal_exit() -> None:
    gpus = sim_gpus()
    gpus[1].set_power_limit_w(500.0)  # not every GPU starts at its default
    with restored_power_limits(gpus) as guard:
        for g in gpus:
            g.set_power_limit_w(300.0)
        assert [g.get_power_limit_w() for g in gpus] == [300.0] * 3
    assert [g.get_power_limit_w() for g in gpus] == [700.0, 500.0, 700.0]
    assert guard.originals_w == [700.0, 500.0, 700.0] and guard.restored


def test_guard_restores_on_exception_and_is_idempotent() -> None:
    gpus = sim_gpus()
    with pytest.raises(RuntimeError, match="crash"), PowerLimitGuard(gpus) as guard:
        gpus[0].set_power_limit_w(250.0)
        raise RuntimeError("crash")
    assert gpus[0].get_power_limit_w() == 700.0
    gpus[0].set_power_limit_w(400.0)  # after the guard: a later restore must not touch it
    assert guard.restore() == []
    assert gpus[0].get_power_limit_w() == 400.0


def test_one_failing_gpu_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    env = simpy.Environment()
    spec = get_gpu("h100-sxm")
    gpus = [SimGpu(env, spec, 0, 0.0), BrokenGpu(env, spec, 1, 0.0), SimGpu(env, spec, 2, 0.0)]
    with PowerLimitGuard(gpus) as guard:
        for g in gpus:
            g.set_power_limit_w(300.0)
        gpus[1].lost = True
    assert [gpus[0].get_power_limit_w(), gpus[2].get_power_limit_w()] == [700.0, 700.0]
    assert [i for i, _ in guard.failures] == [1]
    assert "GPU 1: could not restore its power limit to 700.0 W" in caplog.text
    assert not guard.restored  # so the interpreter-exit backstop stays registered ...
    gpus[1].lost = False
    guard._at_exit()  # ... and tries the failed GPU once more
    assert gpus[1].get_power_limit_w() == 700.0 and guard.restored
    assert limits_note(guard.failures).startswith("power limits NOT restored on GPU 1")
    assert limits_note([]) == "power limits restored"


class ReadOnlyGpu(SimGpu):
    """A GPU this process may read but not set (no root): ``set_power_limit_w`` is refused."""

    def set_power_limit_w(self, power_w: float) -> None:
        raise GpuError(f"GPU {self.index}: set power limit: permission denied")


def test_a_gpu_left_at_its_limit_is_not_set_again(caplog: pytest.LogCaptureFixture) -> None:
    env = simpy.Environment()
    gpus = [ReadOnlyGpu(env, get_gpu("h100-sxm"), i, 0.0) for i in range(2)]
    with PowerLimitGuard(gpus) as guard:
        for g in gpus:  # the run could not cap them: nothing changed, so nothing needs restoring
            with pytest.raises(GpuError, match="permission denied"):
                g.set_power_limit_w(300.0)
    assert guard.failures == [] and guard.restored and "could not restore" not in caplog.text


def test_signal_handlers_chain_and_are_put_back() -> None:
    calls: list[int] = []

    def previous(signum: int, _frame: object) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        gpus = sim_gpus(2)
        with PowerLimitGuard(gpus):
            assert signal.getsignal(signal.SIGTERM) != previous
            gpus[0].set_power_limit_w(200.0)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs on the main thread at the next bytecode
            # Restored first, then the previous handler ran (it does not exit, so the program goes on).
            assert gpus[0].get_power_limit_w() == 700.0
            assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == previous
    finally:
        signal.signal(signal.SIGTERM, old)


CHILD = """
import json, signal, sys, time
from pathlib import Path
from hil.limits import restored_power_limits

# Python raises KeyboardInterrupt on SIGINT unless it started with SIGINT ignored, as a shell's background job
# (a test runner started with `&`) does: set it as an interactive program has it.
signal.signal(signal.SIGINT, signal.default_int_handler)

class FileGpu:
    '''A Gpu whose limit lives in a JSON file, so that another process can read it.'''
    def __init__(self, path, index):
        self.path, self.index, self.name = Path(path), index, "file"
    def _read(self):
        return json.loads(self.path.read_text())
    def get_power_limit_w(self):
        return self._read()[self.index]
    def set_power_limit_w(self, power_w):
        limits = self._read()
        limits[self.index] = power_w
        self.path.write_text(json.dumps(limits))
    def get_power_limit_range_w(self): return (100.0, 700.0)
    def get_default_power_limit_w(self): return 700.0
    def get_power_w(self): return 100.0
    def get_total_energy_j(self): return 0.0
    def get_sm_clock_mhz(self): return 1000.0
    def get_utilization(self): return 0.0

gpus = [FileGpu(sys.argv[1], i) for i in range(2)]
with restored_power_limits(gpus):
    for g in gpus:
        g.set_power_limit_w(150.0)
    print("capped", flush=True)
    # Short waits, as a control loop makes: Python runs a signal handler in the main thread, and when the kernel
    # hands the signal to another thread (numpy's BLAS threads, say) a 60 s sleep would only see it on waking.
    for _ in range(600):
        time.sleep(0.1)
"""


def _default_signal_dispositions() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT),
                                             (signal.SIGHUP, 128 + signal.SIGHUP),  # the SSH session closed
                                             (signal.SIGQUIT, 128 + signal.SIGQUIT)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"])
def test_signal_to_a_child_restores_limits(tmp_path: Path, sig: signal.Signals, status: int) -> None:
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps([700.0, 450.0]))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    # The child starts as from a terminal, whatever started the tests: a signal ignored by the launcher (SIGHUP under
    # nohup, SIGINT and SIGQUIT in a shell's background job) stays ignored in a child, and the guard rightly leaves
    # an ignored signal alone (the program goes on), so it is reset to its default first.
    child = subprocess.Popen([sys.executable, str(script), str(limits)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=_default_signal_dispositions)
    assert child.stdout is not None and child.stdout.readline().strip() == "capped"
    assert json.loads(limits.read_text()) == [150.0, 150.0]
    child.send_signal(sig)
    # SIGTERM, SIGHUP, SIGQUIT: restored, then SystemExit(128 + signal); SIGINT: restored, then KeyboardInterrupt,
    # which Python turns into death by SIGINT (the conventional status of an interrupted program).
    assert child.wait(timeout=20) == status
    assert json.loads(limits.read_text()) == [700.0, 450.0]


# ----- a real GPU, read-only ------------------------------------------------------------------------------
@pytest.fixture
def real_gpu() -> Iterator[NvmlGpu]:
    try:
        gpu = NvmlGpu(0)
    except GpuError as exc:
        pytest.skip(f"no usable NVML GPU: {exc}")
    try:
        yield gpu
    finally:
        gpu.close()


@pytest.mark.gpu
def test_real_gpu_readings_are_sane(real_gpu: NvmlGpu) -> None:
    lo, hi = real_gpu.get_power_limit_range_w()
    assert 0 < lo <= hi
    assert lo <= real_gpu.get_power_limit_w() <= hi
    assert lo <= real_gpu.get_default_power_limit_w() <= hi
    assert 0 < real_gpu.get_power_w() < 2 * hi
    assert real_gpu.get_sm_clock_mhz() > 0
    assert 0.0 <= real_gpu.get_utilization() <= 1.0


@pytest.mark.gpu
def test_real_gpu_energy_counter_is_monotonic(real_gpu: NvmlGpu) -> None:
    try:
        start = real_gpu.energy_sample()
    except NvmlNotSupportedError as exc:
        pytest.skip(f"no energy counter on this GPU: {exc}")
    time.sleep(0.5)
    end = real_gpu.energy_sample()
    assert end.energy_j >= start.energy_j
    # Even idle, a GPU draws power: the average over the window is positive and below twice its max limit.
    assert 0 < average_power_w(start, end) < 2 * real_gpu.get_power_limit_range_w()[1]
