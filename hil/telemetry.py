"""Reading GPUs through the ``sim.gpu.Gpu`` interface: one reading per GPU and window averages from the
energy counter."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.gpu import Gpu


@dataclass(frozen=True)
class GpuReading:
    """One GPU's telemetry at one instant (W, J, MHz, 0-1). ``device_time_s`` is when the device read its energy
    counter on its own clock, in scenario seconds (NVML: monotonic wall time; the twin: its simulated time);
    nan when the device does not say."""

    energy_j: float
    device_time_s: float
    power_w: float
    power_limit_w: float
    clock_mhz: float
    utilization: float


def read_gpu(gpu: Gpu, with_power: bool = False) -> GpuReading:
    """Read one GPU (blocking: NVML or HTTP). The instantaneous power is read only ``with_power`` (window
    averages come from the energy counter; nan otherwise)."""
    sample = getattr(gpu, "energy_sample", None)
    if callable(sample):
        s = sample()
        energy_j, device_time_s = float(s.energy_j), float(s.time_s)
    else:
        energy_j, device_time_s = gpu.get_total_energy_j(), math.nan
    power_w = gpu.get_power_w() if with_power else math.nan
    return GpuReading(energy_j, device_time_s, power_w, gpu.get_power_limit_w(), gpu.get_sm_clock_mhz(),
                      gpu.get_utilization())


def window_power_w(prev: GpuReading, now: GpuReading, window_s: float) -> float:
    """Average power between two readings: the energy counter's change over the time between them, timed by
    the device's own clock when it has one (exact for the twin, whose clock may lag the wall clock), else by the
    plant's."""
    span = now.device_time_s - prev.device_time_s
    if not span > 0:
        span = window_s
    return (now.energy_j - prev.energy_j) / span if span > 0 else now.power_w
