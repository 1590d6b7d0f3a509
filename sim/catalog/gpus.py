"""GPU specifications and the per-GPU-type parameters of the physics.

Datasheet figures carry their source in a comment. Physics parameters (efficiencies, the split of power
into idle / active-base / compute / memory / host-wait parts, the voltage curve) are first estimates that
``pals calibrate`` refines from measured profile tables; their basis is noted beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sim.catalog.calibration import gpu_params

TB = 1e12
GB = 1e9
GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type: datasheet figures plus physics parameters."""

    name: str
    peak_bf16_flops: float  # dense (no sparsity) BF16 tensor-core FLOP/s at the max boost clock
    hbm_bandwidth_bytes_per_s: float
    hbm_bytes: float
    power_limit_min_w: float  # lowest limit the driver accepts (nvmlDeviceGetPowerManagementLimitConstraints)
    power_limit_max_w: float  # highest limit (= TDP for these parts)
    idle_power_w: float  # powered on, no work, lowest clocks
    nvlink_bandwidth_bytes_per_s: float  # per GPU, per direction (PCIe cards: the NVLink bridge or PCIe)
    sm_clock_max_mhz: float  # max boost clock
    sm_clock_min_mhz: float  # lowest clock the governor goes to under a power cap
    # --- physics parameters (see sim.physics) ---
    compute_efficiency: float = 0.6  # achieved / peak FLOP/s for serving GEMMs
    memory_efficiency: float = 0.8  # achieved / peak HBM bandwidth for weight and KV streaming
    link_efficiency: float = 0.7  # achieved / peak link bandwidth for NCCL collectives
    # Fixed latency of one collective (all-reduce / all-to-all) of a decode step's size (up to ~1 MB) over NVLink:
    # vLLM's custom all-reduce takes 7-10 µs on 2-8 H100s (vLLM PR #24532, SGLang PR #2904 microbenchmarks),
    # about 7-8 µs on Blackwell (vLLM PR #37756). Not fitted: operating points cannot separate it from the per-layer
    # kernel latency (a calibration file may still set it).
    collective_latency_s: float = 8e-6
    active_base_power_w: float = 0.0  # extra power while busy at max clock, whatever the work (∝ clock)
    compute_power_w: float = 0.0  # extra power with tensor cores fully busy at max clock (∝ clock^alpha)
    memory_power_w: float = 0.0  # extra power with HBM streaming at full achieved bandwidth
    kv_power_w: float = 0.0  # further extra power while that stream is KV cache read by attention (paged gathers)
    # While a step waits on the host no kernel runs: the GPU draws idle plus this share of the active base power
    # at the max clock, flat at any clock (SMs gated, HBM and links awake). First estimate; fitted on capped rows.
    host_power_share: float = 0.25
    voltage_floor: float = 0.6  # core voltage at and below the knee clock, relative to the max clock's
    voltage_knee: float = 0.5  # clock fraction below which the voltage stays at its floor
    power_limit_default_w: float = 0.0  # 0 → power_limit_max_w

    @property
    def default_power_limit_w(self) -> float:
        """The limit a GPU boots with."""
        return self.power_limit_default_w or self.power_limit_max_w

    @property
    def min_clock_fraction(self) -> float:
        """Lowest clock as a fraction of the max clock."""
        return self.sm_clock_min_mhz / self.sm_clock_max_mhz


# Power split: at max clock with compute and memory both saturated a GPU reaches roughly its TDP
# (large prefill GEMMs do, measured: PALS Mixtral batch 64 draws 379 W under a 400 W A100 cap);
# decode, memory-bound, draws well below it (ML.ENERGY v3 H100 decode runs sit at ~300-450 W of 700 W).
_DATASHEET: dict[str, GpuSpec] = {
    "a100-sxm4-40gb": GpuSpec(
        name="a100-sxm4-40gb",
        peak_bf16_flops=312 * TB,  # NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS (dense)
        hbm_bandwidth_bytes_per_s=1555 * GB,  # A100 40GB SXM datasheet: 1,555 GB/s HBM2
        hbm_bytes=40 * GIB,  # 40 GB HBM2
        power_limit_min_w=100,  # nvidia-smi -q "Min Power Limit" on A100 SXM4: 100 W (PALS sets caps down to 100 W)
        power_limit_max_w=400,  # A100 SXM4 TDP 400 W (datasheet)
        idle_power_w=52,  # nvidia-smi idle A100 SXM4 ~50-60 W (Argonne batch-1 draws are well above it)
        nvlink_bandwidth_bytes_per_s=300 * GB,  # NVLink 3: 600 GB/s bidirectional → 300 GB/s per direction
        sm_clock_max_mhz=1410,  # A100 max boost clock 1,410 MHz (datasheet)
        sm_clock_min_mhz=210,  # nvidia-smi -q -d SUPPORTED_CLOCKS: lowest graphics clock 210 MHz
        active_base_power_w=45,
        compute_power_w=230,
        memory_power_w=90,
    ),
    "a100-sxm4-80gb": GpuSpec(
        name="a100-sxm4-80gb",
        peak_bf16_flops=312 * TB,  # NVIDIA A100 datasheet: BF16 312 TFLOPS dense
        hbm_bandwidth_bytes_per_s=2039 * GB,  # A100 80GB SXM datasheet: 2,039 GB/s HBM2e
        hbm_bytes=80 * GIB,  # 80 GB HBM2e
        power_limit_min_w=100,  # as the 40 GB part; PALS measured caps 100-400 W on this GPU
        power_limit_max_w=400,  # A100 SXM4 TDP 400 W
        idle_power_w=55,  # ~55 W idle (nvidia-smi, HBM2e stacks draw slightly more than 40 GB)
        nvlink_bandwidth_bytes_per_s=300 * GB,  # NVLink 3: 600 GB/s bidirectional
        sm_clock_max_mhz=1410,  # datasheet max boost
        sm_clock_min_mhz=210,  # lowest supported graphics clock
        active_base_power_w=45,
        compute_power_w=230,
        memory_power_w=95,
    ),
    "h100-sxm": GpuSpec(
        name="h100-sxm",
        peak_bf16_flops=989 * TB,  # NVIDIA H100 datasheet: BF16 1,979 TFLOPS with sparsity → 989 dense (SXM5)
        hbm_bandwidth_bytes_per_s=3350 * GB,  # H100 SXM datasheet: 3.35 TB/s HBM3
        hbm_bytes=80 * GIB,  # 80 GB HBM3
        power_limit_min_w=200,  # nvidia-smi -q on H100 SXM5: Min Power Limit 200 W
        power_limit_max_w=700,  # H100 SXM TDP up to 700 W (datasheet)
        idle_power_w=70,  # H100 SXM idle ~65-75 W (nvidia-smi, DGX H100)
        nvlink_bandwidth_bytes_per_s=450 * GB,  # NVLink 4: 900 GB/s bidirectional → 450 GB/s per direction
        sm_clock_max_mhz=1980,  # H100 SXM5 max boost 1,980 MHz
        sm_clock_min_mhz=345,  # lowest supported graphics clock reported by nvidia-smi on H100 SXM5
        active_base_power_w=90,
        compute_power_w=430,
        memory_power_w=160,
    ),
    "h100-pcie": GpuSpec(
        name="h100-pcie",
        peak_bf16_flops=756 * TB,  # NVIDIA H100 datasheet: PCIe BF16 1,513 TFLOPS sparse → 756 dense
        hbm_bandwidth_bytes_per_s=2000 * GB,  # H100 PCIe datasheet: 2 TB/s HBM2e
        hbm_bytes=80 * GIB,  # 80 GB
        power_limit_min_w=200,  # nvidia-smi Min Power Limit on H100 PCIe: 200 W
        power_limit_max_w=350,  # H100 PCIe TDP 300-350 W configurable (datasheet); 350 W max
        idle_power_w=50,  # PCIe card idle ~45-55 W
        nvlink_bandwidth_bytes_per_s=300 * GB,  # NVLink bridge: 600 GB/s bidirectional (datasheet)
        sm_clock_max_mhz=1755,  # H100 PCIe max boost 1,755 MHz
        sm_clock_min_mhz=345,
        active_base_power_w=45,
        compute_power_w=230,
        memory_power_w=80,
    ),
    "h200": GpuSpec(
        name="h200",
        peak_bf16_flops=989 * TB,  # NVIDIA H200 datasheet: BF16 1,979 TFLOPS sparse → 989 dense (SXM)
        hbm_bandwidth_bytes_per_s=4800 * GB,  # H200 datasheet: 4.8 TB/s HBM3e
        hbm_bytes=141 * GB,  # 141 GB HBM3e (decimal GB as stated)
        power_limit_min_w=200,  # as H100 SXM (same board power management)
        power_limit_max_w=700,  # H200 SXM TDP up to 700 W (datasheet)
        idle_power_w=75,
        nvlink_bandwidth_bytes_per_s=450 * GB,  # NVLink 4: 900 GB/s bidirectional
        sm_clock_max_mhz=1980,  # same GH100 die and boost clock as H100 SXM
        sm_clock_min_mhz=345,
        active_base_power_w=90,
        compute_power_w=420,
        memory_power_w=190,
    ),
    "b200": GpuSpec(
        name="b200",
        peak_bf16_flops=2250 * TB,  # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS sparse → 2.25 dense
        hbm_bandwidth_bytes_per_s=7700 * GB,  # HGX B200: 7.7 TB/s HBM3e per GPU (8 TB/s in DGX B200 material)
        hbm_bytes=180 * GB,  # 180 GB HBM3e per GPU (HGX B200)
        power_limit_min_w=300,  # estimate: not in the datasheet; conservative lower bound for the 1 kW part
        power_limit_max_w=1000,  # HGX B200 TDP 1,000 W per GPU
        idle_power_w=120,  # estimate (larger board, two dies)
        nvlink_bandwidth_bytes_per_s=900 * GB,  # NVLink 5: 1.8 TB/s bidirectional → 900 GB/s per direction
        sm_clock_max_mhz=1965,  # B200 max boost reported by nvidia-smi (~1,965 MHz)
        sm_clock_min_mhz=345,  # estimate, as Hopper
        active_base_power_w=130,
        compute_power_w=600,
        memory_power_w=250,
    ),
}


# The catalog: datasheet figures with the fitted parameters of ``traces/calibration`` where there are some.
GPUS: dict[str, GpuSpec] = {name: replace(spec, **gpu_params(name)) for name, spec in _DATASHEET.items()}


def datasheet_gpu(name: str) -> GpuSpec:
    """A GPU with its first-estimate physics parameters (no calibration applied): the starting point of a fit."""
    get_gpu(name)
    return _DATASHEET[name]


class UnknownGpuError(KeyError):
    """A GPU name that is not in the catalog."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_gpu(name: str) -> GpuSpec:
    """Look up a GPU by catalog name."""
    try:
        return GPUS[name]
    except KeyError:
        raise UnknownGpuError(f"unknown GPU {name!r}: expected one of {', '.join(GPUS)}") from None
