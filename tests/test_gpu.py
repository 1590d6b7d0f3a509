"""SimGpu: the GPU interface, limits within range, actuation delay, energy counter."""

from __future__ import annotations

import pytest
import simpy

from sim.catalog import GPUS
from sim.gpu import Gpu, GpuError, SimGpu


def test_simgpu_implements_the_gpu_interface():
    gpu = SimGpu(simpy.Environment(), GPUS["h100-sxm"], 0)
    assert isinstance(gpu, Gpu)
    assert gpu.get_power_limit_range_w() == (200, 700)
    assert gpu.get_default_power_limit_w() == 700
    assert gpu.get_power_limit_w() == 700


def test_limit_outside_range_is_rejected_with_the_range():
    gpu = SimGpu(simpy.Environment(), GPUS["a100-sxm4-80gb"], 3)
    with pytest.raises(GpuError, match="100-400 W"):
        gpu.set_power_limit_w(50)
    with pytest.raises(GpuError, match="GPU 3"):
        gpu.set_power_limit_w(401)


def test_limit_takes_effect_after_the_actuation_delay():
    env = simpy.Environment()
    gpu = SimGpu(env, GPUS["h100-sxm"], 0, actuation_delay_s=0.25)
    seen = []
    gpu.on_limit_change(lambda g: seen.append((env.now, g.get_power_limit_w())))
    gpu.set_power_limit_w(400)
    assert gpu.get_power_limit_w() == 700
    assert gpu.get_requested_power_limit_w() == 400
    env.run(until=0.2)
    assert gpu.get_power_limit_w() == 700
    env.run(until=0.3)
    assert gpu.get_power_limit_w() == 400
    assert seen == [(0.25, 400)]


def test_idle_gpu_draws_idle_power_and_counts_energy():
    env = simpy.Environment()
    gpu = SimGpu(env, GPUS["h100-sxm"], 0)
    env.run(until=10)
    assert gpu.get_power_w() == GPUS["h100-sxm"].idle_power_w
    assert gpu.get_total_energy_j() == pytest.approx(10 * GPUS["h100-sxm"].idle_power_w)
    assert gpu.get_sm_clock_mhz() == GPUS["h100-sxm"].sm_clock_min_mhz
    assert gpu.get_utilization() == 0.0
