"""The digital twin: a vLLM-like OpenAI completions server and an NVML-like device endpoint, both backed by
the simulator running in real time (``hil.twin_sim.TwinSim``), so the hardware path (driver, load generator,
control loop, ``TwinGpu``) runs end to end on a machine without GPUs.

What is simulated: the scenario's FIRST deployment, all its replicas behind the router the scenario names
(``least-loaded`` or ``round-robin``); each replica's GPUs (tensor x data ranks, ``SimGpu``) are the
devices, indexed replica-major (replica r, rank k -> r x ranks + k). The deployment's engine config applies
(``max_num_seqs`` plays vLLM's ``--max-num-seqs``, ``max_num_batched_tokens``, ``block_size``,
``gpu_memory_utilization``, ``max_model_len``), with its physics and cap actuation delay. The engines always
step one iteration per SimPy event (so each token has its own instant). The scenario's workload is NOT used:
arrivals are the HTTP requests. The scenario's controller is NOT run: GPUs boot at their default limit and
limits change only through the device endpoint.

Contract (what clients may rely on)
-----------------------------------
Base URL ``http://127.0.0.1:PORT`` (``pals twin SCENARIO --port PORT``; ``--port 0`` picks a free port and
prints it).

* ``GET /health`` -> 200 ``{"status": "ok"}`` (500 ``{"status": "error", "message": ...}`` if the simulation
  failed).
* ``GET /v1/models`` -> ``{"object": "list", "data": [{"id": MODEL_NAME, "object": "model",
  "max_model_len": N, ...}]}``; MODEL_NAME is the deployment's ``model`` as written in the scenario (catalog
  name; the deployment's name for an inline model).
* ``POST /v1/completions`` (OpenAI completions API, vLLM semantics). Body fields: ``model`` (optional; if
  given and different -> 404 ``{"error": {...}}`` like vLLM), ``prompt`` (a string, a list of one string,
  or a list of token ids (ints); prompt tokens = ``len(list)`` for token ids, else the number of
  whitespace-separated words, min 1), ``max_tokens`` (int >= 1, default 16; null -> 16), ``stream`` (bool,
  default false), ``stream_options: {"include_usage": bool}`` (only with ``stream: true``), ``n`` (1 only);
  ``ignore_eos``, ``min_tokens``, ``temperature`` and any other field are accepted and ignored. The twin
  always generates exactly ``max_tokens`` tokens (as vLLM with ``ignore_eos: true``); each token's text is
  ``" tok"``.
  Non-streaming: when the request finishes, ``{"id", "object": "text_completion", "created", "model",
  "choices": [{"index": 0, "text": ..., "logprobs": null, "finish_reason": "length"}],
  "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}``.
  Streaming: ``Content-Type: text/event-stream``; one ``data: {json}\\n\\n`` chunk per token, sent when the
  simulator samples it (``choices[0].text`` = ``" tok"``, ``finish_reason`` null except ``"length"`` on the
  last); then, with ``include_usage``, a chunk with ``"choices": []`` and ``usage``; then
  ``data: [DONE]\\n\\n``.
  Errors: 400 ``{"error": {"message": ..., "type": "invalid_request_error", "code": 400}}`` for malformed
  JSON, wrong types, ``max_tokens`` < 1, a prompt that is neither a string nor token ids, and a request
  longer than the model (prompt + max_tokens > max_model_len, vLLM's check) or the KV cache.
* NVML-like device endpoint, in NVML's units (mW, mJ):
  ``GET /nvml/devices`` -> ``{"speedup": S, "sim_time_s": T, "devices": [DEV, ...]}``;
  ``GET /nvml/devices/{i}`` -> DEV, where DEV = ``{"index": i, "name": "<gpu catalog name>",
  "power_usage_mw": int, "total_energy_consumption_mj": int (monotonic), "power_limit_mw": int (limit in
  force), "enforced_power_limit_mw": int, "requested_power_limit_mw": int (last accepted request),
  "power_limit_constraints_mw": [min, max], "default_power_limit_mw": int, "sm_clock_mhz": int,
  "utilization_gpu_pct": int}``.
  ``POST /nvml/devices/{i}/power_limit`` body ``{"power_limit_mw": int}`` -> 200 DEV once accepted (the
  simulated GPU applies it after the scenario's ``power.cap_actuation_delay_s`` of simulated time: until
  then ``power_limit_mw`` shows the old limit and ``requested_power_limit_mw`` the new one), 400
  ``{"error": {...}}`` outside the constraints (NVML_ERROR_INVALID_ARGUMENT) or for a malformed body, 404
  for an unknown index.
* Time: the twin's clock is simulated time = ``speedup`` x wall time since the server started. Energy
  counters, power, clocks and utilization are in simulated time (J of simulated time). Convert wall-clock
  measurements to simulated seconds by multiplying by ``speedup`` (from ``GET /nvml/devices``); token
  timings streamed to a client appear ``speedup`` times faster in wall time. ``sim_time_s`` is the
  simulated time reached (it lags ``speedup x wall`` only when the simulation cannot keep up).

Shutdown (SIGINT/SIGTERM): requests in flight end at once, non-streaming ones with 503
``{"error": {...}}``, streams with an error chunk (``code`` 503) and ``data: [DONE]``. A client that
disconnects does not abort its request: it runs on in the simulation (holding its batch slot) to the end.

Start it with ``pals twin SCENARIO [--host 127.0.0.1] [--port 8000] [--speedup 1.0] [--set a.b=v]``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hil.twin_sim import DeviceReading, Event, TwinRequestError, TwinSim, deliver_inline
from sim.gpu import GpuError
from sim.scenario import Scenario

log = logging.getLogger("pals.twin")

TOKEN_TEXT = " tok"
DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 32 * 1024 * 1024


class BadRequest(Exception):
    """A request the server answers with an error status (400 unless told)."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind


def error_response(message: str, status: int = 400, kind: str = "invalid_request_error") -> web.Response:
    """An OpenAI/vLLM-style error body."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


# ----- completions requests -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` request."""

    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count_prompt_tokens(prompt: Any) -> int:
    """Prompt tokens of a completions ``prompt``: ``len`` of a token-id list, else whitespace-separated words
    (at least 1). Raises ``BadRequest`` for anything else."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    if isinstance(prompt, list):
        if not prompt:
            raise BadRequest("prompt: an empty list of token ids is not a prompt")
        if all(_is_int(t) for t in prompt):
            if any(t < 0 for t in prompt):
                raise BadRequest("prompt: token ids must be non-negative integers")
            return len(prompt)
        if all(isinstance(t, str) for t in prompt):
            raise BadRequest("prompt: batched prompts (a list of several strings) are not supported by the twin; "
                             "send one request per prompt")
        raise BadRequest("prompt: a list prompt must hold token ids (integers)")
    raise BadRequest(f"prompt must be a string or a list of token ids (integers), got {type(prompt).__name__}")


def parse_completion(body: Any, model_name: str) -> CompletionRequest:
    """Validate a completions body (vLLM semantics); raises ``BadRequest`` with the reason."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise BadRequest(f"model must be a string, got {type(model).__name__}")
        if model != model_name:
            raise BadRequest(f"The model `{model}` does not exist.", status=404, kind="NotFoundError")
    if "prompt" not in body:
        raise BadRequest("prompt is required")
    prompt_tokens = count_prompt_tokens(body["prompt"])
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens):
        raise BadRequest(f"max_tokens must be an integer, got {max_tokens!r}")
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be a boolean, got {stream!r}")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object such as {\"include_usage\": true}")
        if not stream:
            raise BadRequest("Stream options can only be defined when `stream=True`.")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise BadRequest(f"stream_options.include_usage must be a boolean, got {include_usage!r}")
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest(f"n must be 1 (the twin generates one choice per request), got {n!r}")
    return CompletionRequest(prompt_tokens, max_tokens, stream, include_usage)


class _QueueSink:
    """A request's events, queued on the server's event loop (the simulation delivers them there)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, float | str]] = asyncio.Queue()

    def token(self, sim_time_s: float) -> None:
        """One token was sampled."""
        self.queue.put_nowait(("token", sim_time_s))

    def finish(self, sim_time_s: float) -> None:
        """The request finished."""
        self.queue.put_nowait(("finish", sim_time_s))

    def error(self, message: str) -> None:
        """The engine dropped the request."""
        self.queue.put_nowait(("error", message))

    def fail(self, message: str) -> None:
        """The simulation failed: end the response with a server error."""
        self.queue.put_nowait(("failed", message))

    def abort(self, message: str) -> None:
        """The server is shutting down: end the response now."""
        self.queue.put_nowait(("abort", message))


# ----- device endpoint ----------------------------------------------------------------------------------
def _mw(w: float) -> int:
    return round(w * 1000.0)


def device_json(r: DeviceReading) -> dict[str, Any]:
    """A device's telemetry in NVML's units (mW, mJ, MHz, %)."""
    lo, hi = r.power_limit_range_w
    return {
        "index": r.index,
        "name": r.name,
        "power_usage_mw": _mw(r.power_w),
        "total_energy_consumption_mj": math.floor(r.total_energy_j * 1000.0),  # floor keeps it monotonic
        "power_limit_mw": _mw(r.power_limit_w),
        "enforced_power_limit_mw": _mw(r.power_limit_w),
        "requested_power_limit_mw": _mw(r.requested_power_limit_w),
        "power_limit_constraints_mw": [_mw(lo), _mw(hi)],
        "default_power_limit_mw": _mw(r.default_power_limit_w),
        "sm_clock_mhz": round(r.sm_clock_mhz),
        "utilization_gpu_pct": round(r.utilization * 100.0),
    }


# ----- the server ---------------------------------------------------------------------------------------
class TwinServer:
    """The twin's HTTP server around a ``TwinSim``."""

    def __init__(self, scenario: Scenario, speedup: float = 1.0, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.sim = TwinSim(scenario, speedup)
        self.host = host
        self.port = port
        self.model_name = self.sim.model_name
        self._ids = itertools.count()
        self._runner: web.AppRunner | None = None
        self._active: set[_QueueSink] = set()  # requests in flight, ended with an error on shutdown
        self.url = ""

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/nvml/devices", self.devices)
        app.router.add_get("/nvml/devices/{index}", self.device)
        app.router.add_post("/nvml/devices/{index}/power_limit", self.power_limit)
        return app

    async def start(self) -> str:
        """Bind, start the simulation clock and thread; return the base URL."""
        loop = asyncio.get_running_loop()

        def deliver(batch: list[Event]) -> None:
            loop.call_soon_threadsafe(deliver_inline, batch)

        self.sim.deliver = deliver
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        port = self._runner.addresses[0][1]
        host = self.host if ":" not in self.host else f"[{self.host}]"
        self.url = f"http://{host}:{port}"
        self.sim.start()
        return self.url

    async def close(self) -> None:
        """Stop serving: requests in flight end with an error (503, or an error chunk in a stream), then the
        simulation thread stops."""
        for sink in list(self._active):
            sink.abort("the twin is shutting down")
        self.sim.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----- handlers -------------------------------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        """Liveness."""
        if self.sim.failure is not None:
            return web.json_response({"status": "error", "message": f"simulation failed: {self.sim.failure!r}"},
                                     status=500)
        return web.json_response({"status": "ok"})

    async def models(self, _request: web.Request) -> web.Response:
        """The one model served."""
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "pals-twin",
            "root": self.model_name, "max_model_len": self.sim.max_model_len}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        try:
            raw = await request.text()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, LookupError) as exc:  # LookupError: bad charset
                raise BadRequest(f"invalid JSON body: {exc}") from None
            req = parse_completion(body, self.model_name)
            self.sim.check_request(req.prompt_tokens, req.max_tokens)
        except BadRequest as exc:
            return error_response(exc.message, exc.status, exc.kind)
        except TwinRequestError as exc:
            return error_response(str(exc))
        sink = _QueueSink()
        try:
            self.sim.submit(req.prompt_tokens, req.max_tokens, sink)
        except TwinRequestError as exc:
            return error_response(str(exc))
        self._active.add(sink)
        try:
            return await self._respond(request, req, sink)
        finally:
            self._active.discard(sink)

    async def _respond(self, request: web.Request, req: CompletionRequest, sink: _QueueSink) -> web.StreamResponse:
        rid = f"cmpl-twin-{next(self._ids)}"
        created = int(time.time())
        if req.stream:
            return await self._stream(request, req, sink, rid, created)
        generated = 0
        while True:
            kind, value = await sink.queue.get()
            if kind == "token":
                generated += 1
            elif kind == "finish":
                break
            elif kind == "abort":
                return error_response(str(value), 503, "service_unavailable")
            elif kind == "failed":
                return error_response(str(value), 500, "internal_error")
            else:
                return error_response(f"the engine dropped the request: {value}")
        return web.json_response({
            "id": rid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "text": TOKEN_TEXT * generated, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None}],
            "usage": _usage(req.prompt_tokens, generated)})

    async def _stream(self, request: web.Request, req: CompletionRequest, sink: _QueueSink, rid: str,
                      created: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
        await resp.prepare(request)
        generated = 0
        try:
            while True:
                kind, value = await sink.queue.get()
                if kind == "token":
                    generated += 1
                    last = generated >= req.max_tokens
                    await _send(resp, {"id": rid, "object": "text_completion", "created": created,
                                       "model": self.model_name,
                                       "choices": [{"index": 0, "text": TOKEN_TEXT, "logprobs": None,
                                                    "finish_reason": "length" if last else None,
                                                    "stop_reason": None}]})
                elif kind == "finish":
                    break
                else:
                    message = f"the engine dropped the request: {value}" if kind == "error" else str(value)
                    code, kind_name = {"abort": (503, "service_unavailable"),
                                       "failed": (500, "internal_error")}.get(kind, (400, "invalid_request_error"))
                    await _send(resp, {"error": {"message": message, "type": kind_name, "code": code}})
                    break
            if req.include_usage:
                await _send(resp, {"id": rid, "object": "text_completion", "created": created,
                                   "model": self.model_name, "choices": [],
                                   "usage": _usage(req.prompt_tokens, generated)})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            log.info("client of %s went away; the request runs on in the simulation", rid)
        return resp

    async def devices(self, _request: web.Request) -> web.Response:
        """``GET /nvml/devices``."""
        sim_time_s, readings = self.sim.read_devices()
        return web.json_response({"speedup": self.sim.speedup, "sim_time_s": sim_time_s,
                                  "devices": [device_json(r) for r in readings]})

    def _index(self, request: web.Request) -> int:
        text = request.match_info["index"]
        if not (text.isascii() and text.isdigit()) or not 0 <= int(text) < len(self.sim.gpus):
            raise BadRequest(f"no GPU {text!r}: the twin has {len(self.sim.gpus)} "
                             f"(indices 0-{len(self.sim.gpus) - 1})", status=404, kind="not_found")
        return int(text)

    async def device(self, request: web.Request) -> web.Response:
        """``GET /nvml/devices/{i}``."""
        try:
            index = self._index(request)
        except BadRequest as exc:
            return error_response(exc.message, exc.status, exc.kind)
        return web.json_response(device_json(self.sim.read_device(index)))

    async def power_limit(self, request: web.Request) -> web.Response:
        """``POST /nvml/devices/{i}/power_limit`` with ``{"power_limit_mw": int}``."""
        try:
            index = self._index(request)
            try:
                body = json.loads(await request.text())
            except (json.JSONDecodeError, UnicodeDecodeError, LookupError) as exc:  # LookupError: bad charset
                raise BadRequest(f"invalid JSON body: {exc}") from None
            if not isinstance(body, dict) or "power_limit_mw" not in body:
                raise BadRequest('expected a JSON object {"power_limit_mw": int}')
            mw = body["power_limit_mw"]
            if not _is_int(mw):
                raise BadRequest(f"power_limit_mw must be an integer (mW), got {mw!r}")
            lo, hi = self.sim.gpus[index].get_power_limit_range_w()
            lo_mw, hi_mw = _mw(lo), _mw(hi)
            if not lo_mw <= mw <= hi_mw:
                raise BadRequest(f"GPU {index}: power limit {mw} mW is outside the constraints [{lo_mw}, {hi_mw}] mW "
                                 "(NVML_ERROR_INVALID_ARGUMENT)", kind="invalid_argument")
            try:
                reading = self.sim.set_power_limit_w(index, mw / 1000.0)
            except GpuError as exc:
                raise BadRequest(str(exc), kind="invalid_argument") from None
        except BadRequest as exc:
            return error_response(exc.message, exc.status, exc.kind)
        log.info("GPU %d: power limit %d mW requested", index, mw)
        return web.json_response(device_json(reading))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _send(resp: web.StreamResponse, payload: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every error as ``{"error": {...}}``: unknown routes, wrong methods, oversized bodies, and bugs (500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.reason or exc.text or "error", exc.status,
                              "not_found" if exc.status == 404 else "invalid_request_error")
    except Exception as exc:  # never die on a request: report it
        log.exception("twin: %s %s failed", request.method, request.path)
        return error_response(f"internal error: {exc!r}", 500, "internal_error")


# ----- running it ---------------------------------------------------------------------------------------
def serve(scenario: Scenario, host: str = "127.0.0.1", port: int = 8000, speedup: float = 1.0,
          announce: Callable[[TwinServer], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then close cleanly (blocking; call from the main thread)."""

    async def main() -> None:
        server = TwinServer(scenario, speedup, host, port)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if announce is not None:
            announce(server)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await server.close()

    asyncio.run(main())
