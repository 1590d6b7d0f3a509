"""``--gpus``: NVML GPUs by index, or the digital twin's devices; with the guard that restores their limits."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sim.errors import PalsError
from sim.gpu import Gpu, GpuError


class DeviceSpecError(PalsError):
    """A ``--gpus`` value that names no usable GPUs."""


@dataclass
class Devices:
    """The GPUs of a hardware run, their time scale and the guard to run them under."""

    gpus: list[Gpu]
    speedup: float  # scenario seconds per wall second (1 on real GPUs; the twin's --speedup)
    guard: Callable[[list[Gpu]], AbstractContextManager[Any]]

    def __enter__(self) -> Devices:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release every GPU handle (NVML's reference count, the twin's HTTP client)."""
        for gpu in self.gpus:
            close = getattr(gpu, "close", None)
            if close is not None:
                close()


def parse_indices(spec: str) -> list[int]:
    """``"0,1,2,3"`` → ``[0, 1, 2, 3]``; raise ``DeviceSpecError`` on anything else."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise DeviceSpecError(f"--gpus {spec!r}: expected comma-separated GPU indices (e.g. 0,1,2,3) or 'twin'")
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise DeviceSpecError(f"--gpus {spec!r}: an index repeats")
    return indices


def open_gpus(spec: str, endpoint: str) -> Devices:
    """Open the GPUs ``--gpus`` names: ``twin`` (the twin's devices at ``endpoint``) or NVML indices."""
    from hil.limits import restored_power_limits

    if spec.strip().lower() == "twin":
        from hil.twin_gpu import open_twin_gpus, twin_speedup

        try:
            gpus: list[Gpu] = list(open_twin_gpus(endpoint))
            speedup = twin_speedup(endpoint)
        except GpuError as exc:
            raise DeviceSpecError(f"--gpus twin: {exc}") from None
        if not gpus:
            raise DeviceSpecError(f"--gpus twin: the twin at {endpoint} lists no device")
        return Devices(gpus, speedup, restored_power_limits)
    indices = parse_indices(spec)
    from hil.nvml import open_nvml_gpus

    try:
        return Devices(list(open_nvml_gpus(indices)), 1.0, restored_power_limits)
    except GpuError as exc:
        raise DeviceSpecError(f"--gpus {spec}: {exc}") from None
