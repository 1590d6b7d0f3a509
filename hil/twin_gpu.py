"""``TwinGpu``: the ``Gpu`` interface over the digital twin's NVML-like device endpoint (``hil.twin``).

A synchronous ``httpx`` client. The endpoint speaks NVML's units; this class converts them at the boundary
exactly as ``NvmlGpu`` does (mW -> W, mJ -> J) and, like ``NvmlGpu``, clamps a requested limit to the
device's constraints (``clamp=False`` sends it as given, so an out-of-range value comes back as an error).
Energy and time are in the twin's simulated time: ``energy_sample`` pairs the counter with ``sim_time_s``.
Failures become ``TwinGpuError`` subclasses with a clear message.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from hil.nvml import EnergySample
from sim.gpu import GpuError

log = logging.getLogger("pals.hil")

DEFAULT_TIMEOUT_S = 5.0


class TwinGpuError(GpuError):
    """A twin device operation that failed."""


class TwinConnectionError(TwinGpuError):
    """The twin cannot be reached."""


class TwinRangeError(TwinGpuError):
    """The twin refused a power limit outside the device's constraints (NVML_ERROR_INVALID_ARGUMENT)."""


class TwinInvalidIndexError(TwinGpuError):
    """No device with that index."""


class TwinProtocolError(TwinGpuError):
    """The endpoint answered something that is not the device API (garbage JSON, missing fields)."""


def base_url(endpoint_url: str) -> str:
    """The twin's base URL from a base URL or a ``.../nvml/devices`` URL."""
    url = endpoint_url.strip().rstrip("/")
    for suffix in ("/nvml/devices", "/nvml"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


class _Endpoint:
    """The HTTP side, shared by the devices of one twin."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, client: httpx.Client | None = None) -> None:
        self.url = base_url(url)
        self.client = client or httpx.Client(base_url=self.url, timeout=timeout_s)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self.client.request(method, path, json=body)
        except httpx.ConnectError as exc:
            raise TwinConnectionError(f"cannot reach the twin at {self.url}: {exc} (is `pals twin` running on "
                                      "that address?)") from None
        except httpx.TimeoutException:
            raise TwinConnectionError(f"the twin at {self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as exc:
            raise TwinConnectionError(f"{method} {self.url}{path} failed: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            raise TwinProtocolError(f"{method} {self.url}{path}: HTTP {resp.status_code} with a body that is not "
                                    f"JSON: {resp.text[:200]!r}") from None
        if resp.status_code != 200:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            message = message or f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code == 400:
                raise TwinRangeError(f"the twin refused {method} {path}: {message}")
            if resp.status_code == 404:
                raise TwinInvalidIndexError(f"the twin at {self.url}: {message}")
            raise TwinGpuError(f"the twin at {self.url}: {method} {path}: {message}")
        if not isinstance(data, dict):
            raise TwinProtocolError(f"{method} {self.url}{path}: expected a JSON object, got {type(data).__name__}")
        return data

    def close(self) -> None:
        self.client.close()


def _field(dev: dict[str, Any], key: str) -> Any:
    try:
        return dev[key]
    except KeyError:
        raise TwinProtocolError(f"device answer lacks {key!r}: {dev!r}"[:300]) from None


def _number(dev: dict[str, Any], key: str) -> float:
    v = _field(dev, key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TwinProtocolError(f"device field {key!r} is not a number: {v!r}")
    return float(v)


class TwinGpu:
    """One device of a running twin, through its HTTP device endpoint."""

    def __init__(self, endpoint_url: str, index: int, *, clamp: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S,
                 endpoint: _Endpoint | None = None) -> None:
        self._ep = endpoint or _Endpoint(endpoint_url, timeout_s)
        self.index = index
        self.clamp = clamp
        dev = self.read()
        self.name = str(_field(dev, "name"))
        lo, hi = _field(dev, "power_limit_constraints_mw")
        self._range_w = (float(lo) / 1000.0, float(hi) / 1000.0)

    def read(self) -> dict[str, Any]:
        """The device's raw record (NVML units), as the endpoint returns it."""
        return self._ep.request("GET", f"/nvml/devices/{self.index}")

    # ----- the Gpu interface ----------------------------------------------------------------------------
    def get_power_limit_w(self) -> float:
        """The limit in force."""
        return _number(self.read(), "power_limit_mw") / 1000.0

    def get_requested_power_limit_w(self) -> float:
        """The last limit the device accepted (in force after the actuation delay)."""
        return _number(self.read(), "requested_power_limit_mw") / 1000.0

    def set_power_limit_w(self, power_w: float) -> float:
        """Request a new limit (mW on the wire); returns the limit requested. With ``clamp`` (default), a value
        outside the constraints is clamped like ``NvmlGpu`` does; without, it raises ``TwinRangeError``."""
        lo, hi = self._range_w
        mw = round(power_w * 1000.0)
        if self.clamp:
            clamped = min(max(mw, round(lo * 1000.0)), round(hi * 1000.0))
            if clamped != mw:
                log.info("twin GPU %d: power limit %.1f W clamped to %.1f W (constraints %g-%g W)", self.index,
                         power_w, clamped / 1000.0, lo, hi)
            mw = clamped
        self._ep.request("POST", f"/nvml/devices/{self.index}/power_limit", {"power_limit_mw": mw})
        return mw / 1000.0

    def get_power_limit_range_w(self) -> tuple[float, float]:
        """The device's constraints."""
        return self._range_w

    def get_default_power_limit_w(self) -> float:
        """The limit the device boots with."""
        return _number(self.read(), "default_power_limit_mw") / 1000.0

    def get_power_w(self) -> float:
        """Instantaneous power draw."""
        return _number(self.read(), "power_usage_mw") / 1000.0

    def get_total_energy_j(self) -> float:
        """Monotonic energy counter (J of simulated time)."""
        return _number(self.read(), "total_energy_consumption_mj") / 1000.0

    def get_sm_clock_mhz(self) -> float:
        """Current SM clock."""
        return _number(self.read(), "sm_clock_mhz")

    def get_utilization(self) -> float:
        """Busy share over the last second of simulated time (0-1)."""
        return _number(self.read(), "utilization_gpu_pct") / 100.0

    # ----- helpers ---------------------------------------------------------------------------------------
    def energy_sample(self) -> EnergySample:
        """The energy counter and the twin's simulated time, read together (for ``average_power_w``)."""
        data = self._ep.request("GET", "/nvml/devices")
        devices = _field(data, "devices")
        if not isinstance(devices, list) or not 0 <= self.index < len(devices):
            raise TwinProtocolError(f"/nvml/devices does not list device {self.index}")
        return EnergySample(_number(data, "sim_time_s"), _number(devices[self.index], "total_energy_consumption_mj")
                            / 1000.0)

    def close(self) -> None:
        """Close the HTTP client (shared by every device opened together)."""
        self._ep.close()


def twin_speedup(endpoint_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """The twin's speed-up (simulated seconds per wall-clock second)."""
    ep = _Endpoint(endpoint_url, timeout_s)
    try:
        return _number(ep.request("GET", "/nvml/devices"), "speedup")
    finally:
        ep.close()


def open_twin_gpus(endpoint_url: str, *, clamp: bool = True, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[TwinGpu]:
    """Every device of the twin at ``endpoint_url`` (its base URL), sharing one HTTP client."""
    ep = _Endpoint(endpoint_url, timeout_s)
    try:
        data = ep.request("GET", "/nvml/devices")
        devices = _field(data, "devices")
        if not isinstance(devices, list):
            raise TwinProtocolError(f"{ep.url}/nvml/devices: 'devices' is not a list")
        return [TwinGpu(ep.url, i, clamp=clamp, endpoint=ep) for i in range(len(devices))]
    except BaseException:
        ep.close()
        raise
