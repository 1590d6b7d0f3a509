"""``NvmlGpu``: the ``Gpu`` interface over NVML (package nvidia-ml-py, module ``pynvml``), Zeus style.

NVML speaks mW, mJ and MHz; this module converts at the boundary and speaks W, J and MHz like every ``Gpu``.
Power is NVML's power reading (``nvmlDeviceGetPowerUsage``); energy is the device's monotonic counter
(``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer), from which ``average_power_w`` gives the exact
average power over a window. ``set_power_limit_w`` clamps to the device's constraints and returns the limit
set; it needs root (or CAP_SYS_ADMIN).

NVML failures become ``NvmlError`` subclasses (``sim.gpu.GpuError``) whose message says what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import pynvml

from sim.gpu import GpuError

log = logging.getLogger("pals.hil")


class NvmlError(GpuError):
    """An NVML call that failed."""


class NvmlUnavailableError(NvmlError):
    """No NVIDIA driver or NVML library on this machine."""


class NvmlPermissionError(NvmlError):
    """The operation needs root."""


class NvmlNotSupportedError(NvmlError):
    """The device does not support the operation."""


class NvmlGpuLostError(NvmlError):
    """The GPU fell off the bus or stopped responding."""


class NvmlInvalidIndexError(NvmlError):
    """No GPU with that index."""


class NvmlInvalidArgumentError(NvmlError):
    """NVML rejected an argument (e.g. a limit outside the constraints)."""


PERMISSION_HINT = ("setting power limits needs root: run as root (e.g. `sudo -E .venv/bin/pals hil ...`) or grant "
                   "the process CAP_SYS_ADMIN")


def translate(exc: pynvml.NVMLError, what: str) -> NvmlError:
    """Our exception for an NVML error raised while doing ``what``."""
    code = getattr(exc, "value", None)
    if code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return NvmlUnavailableError(f"{what}: the NVML library and the loaded NVIDIA kernel driver differ in version "
                                    f"({exc}): a driver was upgraded without reloading it; reboot or reload the "
                                    "nvidia kernel modules")
    if code == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
        return NvmlNotSupportedError(f"{what}: the installed NVIDIA driver's NVML lacks this function ({exc}): the "
                                     "driver is older than this call needs; upgrade it")
    if code in (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
        return NvmlUnavailableError(f"{what}: NVML is not available ({exc}): no NVIDIA driver / NVML library found "
                                    "on this machine (install the driver, or use the digital twin: `pals twin`)")
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return NvmlPermissionError(f"{what}: permission denied ({exc}): {PERMISSION_HINT}")
    if code == pynvml.NVML_ERROR_NOT_SUPPORTED:
        return NvmlNotSupportedError(f"{what}: not supported by this GPU or driver ({exc})")
    if code == pynvml.NVML_ERROR_GPU_IS_LOST:
        return NvmlGpuLostError(f"{what}: the GPU is lost ({exc}): it fell off the bus or stopped responding; "
                                "check `nvidia-smi` and dmesg, a reset or reboot may be needed")
    if code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
        return NvmlInvalidArgumentError(f"{what}: invalid argument ({exc})")
    if code == pynvml.NVML_ERROR_UNINITIALIZED:
        return NvmlError(f"{what}: NVML is not initialised ({exc})")
    return NvmlError(f"{what}: NVML error {code} ({exc})")


# ----- NVML initialisation (reference-counted: nvmlInit once per process while GPUs are open) ------------
_init_lock = threading.Lock()
_init_count = 0


def nvml_init() -> None:
    """Initialise NVML (reference-counted)."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise translate(exc, "nvmlInit") from None
            except OSError as exc:  # some builds surface a missing library as an OSError
                raise NvmlUnavailableError(f"nvmlInit: NVML is not available ({exc}): no NVIDIA driver / NVML "
                                           "library found on this machine") from None
        _init_count += 1


def nvml_shutdown() -> None:
    """Release one reference to NVML; shut it down with the last."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            return
        _init_count -= 1
        if _init_count == 0:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)


@dataclass(frozen=True)
class EnergySample:
    """An energy counter reading and when it was taken (seconds on a monotonic clock)."""

    time_s: float
    energy_j: float


def average_power_w(start: EnergySample, end: EnergySample) -> float:
    """Average power between two energy samples: energy difference over elapsed time."""
    duration_s = end.time_s - start.time_s
    if duration_s <= 0:
        raise ValueError(f"the window must have a positive duration, got {duration_s} s")
    return (end.energy_j - start.energy_j) / duration_s


class NvmlGpu:
    """A real GPU through NVML (the ``sim.gpu.Gpu`` interface)."""

    def __init__(self, index: int) -> None:
        nvml_init()
        self._open = True
        try:
            count = self._call("nvmlDeviceGetCount", pynvml.nvmlDeviceGetCount)
            if not 0 <= index < count:
                raise NvmlInvalidIndexError(f"no GPU {index}: NVML sees {count} GPU(s) (indices 0-{count - 1})"
                                            if count else f"no GPU {index}: NVML sees no GPU")
            self.index = index
            try:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError as exc:
                if getattr(exc, "value", None) == pynvml.NVML_ERROR_INVALID_ARGUMENT:
                    raise NvmlInvalidIndexError(f"no GPU {index}: NVML sees {count} GPU(s)") from None
                raise translate(exc, f"GPU {index}: nvmlDeviceGetHandleByIndex") from None
            name = self._call("nvmlDeviceGetName", pynvml.nvmlDeviceGetName, self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except BaseException:
            self.close()
            raise

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            where = f"GPU {self.index}: {what}" if hasattr(self, "index") else what
            raise translate(exc, where) from None

    # ----- power limit ----------------------------------------------------------------------------------
    def get_power_limit_w(self) -> float:
        """The power management limit (nvmlDeviceGetPowerManagementLimit)."""
        return self._call("nvmlDeviceGetPowerManagementLimit", pynvml.nvmlDeviceGetPowerManagementLimit,
                          self._handle) / 1000.0

    def get_power_limit_range_w(self) -> tuple[float, float]:
        """Lowest and highest accepted limit (nvmlDeviceGetPowerManagementLimitConstraints)."""
        lo, hi = self._call("nvmlDeviceGetPowerManagementLimitConstraints",
                            pynvml.nvmlDeviceGetPowerManagementLimitConstraints, self._handle)
        return lo / 1000.0, hi / 1000.0

    def get_default_power_limit_w(self) -> float:
        """The limit the device boots with (nvmlDeviceGetPowerManagementDefaultLimit)."""
        return self._call("nvmlDeviceGetPowerManagementDefaultLimit", pynvml.nvmlDeviceGetPowerManagementDefaultLimit,
                          self._handle) / 1000.0

    def set_power_limit_w(self, power_w: float) -> float:
        """Set the power limit, clamped to the device's constraints; returns the limit set (W).

        Needs root: ``NvmlPermissionError`` says how to grant it.
        """
        lo_mw, hi_mw = self._call("nvmlDeviceGetPowerManagementLimitConstraints",
                                  pynvml.nvmlDeviceGetPowerManagementLimitConstraints, self._handle)
        mw = round(power_w * 1000.0)
        clamped = min(max(mw, int(lo_mw)), int(hi_mw))
        if clamped != mw:
            log.warning("GPU %d: power limit %.1f W clamped to %.1f W (constraints %.1f-%.1f W)", self.index, power_w,
                        clamped / 1000.0, lo_mw / 1000.0, hi_mw / 1000.0)
        self._call("nvmlDeviceSetPowerManagementLimit", pynvml.nvmlDeviceSetPowerManagementLimit, self._handle,
                   clamped)
        log.info("GPU %d: power limit set to %.1f W", self.index, clamped / 1000.0)
        return clamped / 1000.0

    # ----- telemetry ------------------------------------------------------------------------------------
    def get_power_w(self) -> float:
        """Power draw now (nvmlDeviceGetPowerUsage)."""
        return self._call("nvmlDeviceGetPowerUsage", pynvml.nvmlDeviceGetPowerUsage, self._handle) / 1000.0

    def get_total_energy_j(self) -> float:
        """Energy since the driver was loaded (nvmlDeviceGetTotalEnergyConsumption, monotonic)."""
        return self._call("nvmlDeviceGetTotalEnergyConsumption", pynvml.nvmlDeviceGetTotalEnergyConsumption,
                          self._handle) / 1000.0

    def energy_sample(self) -> EnergySample:
        """The energy counter with the monotonic time it was read (for ``average_power_w``)."""
        energy_j = self.get_total_energy_j()
        return EnergySample(time.monotonic(), energy_j)

    def average_power_w(self, since: EnergySample) -> float:
        """Average power from ``since`` until now, from the energy counter."""
        return average_power_w(since, self.energy_sample())

    def get_sm_clock_mhz(self) -> float:
        """Current SM clock (nvmlDeviceGetClockInfo, NVML_CLOCK_SM)."""
        return float(self._call("nvmlDeviceGetClockInfo", pynvml.nvmlDeviceGetClockInfo, self._handle,
                                pynvml.NVML_CLOCK_SM))

    def get_utilization(self) -> float:
        """GPU busy share over NVML's last sample period (nvmlDeviceGetUtilizationRates().gpu / 100)."""
        rates = self._call("nvmlDeviceGetUtilizationRates", pynvml.nvmlDeviceGetUtilizationRates, self._handle)
        return rates.gpu / 100.0

    def close(self) -> None:
        """Release this GPU's reference to NVML (idempotent)."""
        if getattr(self, "_open", False):
            self._open = False
            nvml_shutdown()


def open_nvml_gpus(indices: list[int] | None = None) -> list[NvmlGpu]:
    """Open GPUs by index (``None``: every GPU NVML sees). Closes those already opened if one fails."""
    if indices is None:
        nvml_init()
        try:
            try:
                count = pynvml.nvmlDeviceGetCount()
            except pynvml.NVMLError as exc:
                raise translate(exc, "nvmlDeviceGetCount") from None
            indices = list(range(count))
        finally:
            nvml_shutdown()
    if len(set(indices)) != len(indices):
        raise NvmlInvalidIndexError(f"GPU indices repeat: {indices}")
    gpus: list[NvmlGpu] = []
    try:
        for i in indices:
            gpus.append(NvmlGpu(i))
    except BaseException:
        for g in gpus:
            g.close()
        raise
    return gpus
