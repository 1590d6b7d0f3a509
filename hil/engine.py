"""A driver for a vLLM OpenAI-compatible server: streamed completions, timed per token.

Every request is sent as ``POST /v1/completions`` with a prompt of token ids (exactly the scenario's prompt
length; ids drawn deterministically from the seed), ``max_tokens = min_tokens =`` the request's output
tokens, ``ignore_eos: true`` and ``stream: true`` with usage. The driver fills the simulator's ``Request``
record: first-token time, finish time, generated tokens (from ``usage``) and, when something goes wrong,
``drop_reason`` (``http <status>: …``, ``server error in stream …``, ``timeout: …``, ``connection: …``,
``bad response: …``). Times are in scenario seconds, from a clock the caller supplies (wall time × the twin's
speed-up). Nothing here raises on a bad response: a request that fails is a dropped request with its reason;
only ``probe_server`` raises ``EngineError``, with a message a user can act on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from sim.errors import PalsError
from sim.workload import Request

PROMPT_TOKEN_ID_RANGE = (1000, 30000)  # ordinary (non-special) token ids in every catalog model's vocabulary
_SHOWN = 160  # characters of a bad body quoted in a message


class EngineError(PalsError):
    """The server cannot be used: unreachable, or not an OpenAI-compatible completions server."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /v1/models`` says about the server."""

    url: str
    model_id: str
    max_model_len: int | None  # None: the server does not say


def _quote(text: str) -> str:
    text = text.strip().replace("\n", " ")
    return repr(text[:_SHOWN] + ("…" if len(text) > _SHOWN else ""))


def connection_reason(exc: BaseException) -> str:
    """A short, human reason for a transport failure."""
    text = str(exc) or type(exc).__name__
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps the socket error (anyio: "All connection attempts failed")
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return "connection refused" + (f" ({text})" if "refused" not in text.lower() else "")
        seen = seen.__cause__ or seen.__context__
    return text


def normalise_url(url: str) -> str:
    """The server's base URL without a trailing slash (``/v1`` suffixes are accepted and dropped)."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    expected = "expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000"
    if not url.startswith(("http://", "https://")):
        raise EngineError(f"--endpoint {url!r}: {expected}")
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:  # a bad port, an unclosed IPv6 bracket, ...
        raise EngineError(f"--endpoint {url!r}: {exc}; {expected}") from None
    if not host:
        raise EngineError(f"--endpoint {url!r}: no host; {expected}")
    return url


async def probe_server(client: httpx.AsyncClient, url: str) -> ServerInfo:
    """Ask the server for its model (``GET /v1/models``); raise ``EngineError`` if it cannot serve us."""
    where = f"{url}/v1/models"
    try:
        resp = await client.get(where, timeout=10.0)
    except httpx.TimeoutException:
        raise EngineError(f"cannot reach vLLM at {url}: no answer from {where} within 10 s") from None
    except httpx.TransportError as exc:
        raise EngineError(f"cannot reach vLLM at {url}: {connection_reason(exc)}; is `vllm serve` running "
                          "there?") from None
    if resp.status_code != 200:
        raise EngineError(f"vLLM at {url}: GET /v1/models answered HTTP {resp.status_code}: {_quote(resp.text)}")
    try:
        body = resp.json()
        first = body["data"][0]
        model_id = str(first["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise EngineError(f"vLLM at {url}: GET /v1/models did not return an OpenAI model list "
                          f"(got {_quote(resp.text)})") from None
    raw_len = first.get("max_model_len") if isinstance(first, dict) else None
    max_len = int(raw_len) if isinstance(raw_len, int | float) and raw_len > 0 else None
    return ServerInfo(url, model_id, max_len)


def prompt_token_ids(seed: int, deployment_index: int, request_id: int, n: int) -> list[int]:
    """``n`` prompt token ids for one request: the same for the same seed, deployment and request id."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, deployment_index, request_id, 0x1D5]))
    lo, hi = PROMPT_TOKEN_ID_RANGE
    return rng.integers(lo, hi, size=n).tolist()


class _BadResponse(Exception):
    """A response that is not what an OpenAI-compatible server sends (turned into a drop reason)."""


class EngineDriver:
    """Sends requests to one server and times their tokens (scenario seconds, from ``clock``)."""

    def __init__(self, client: httpx.AsyncClient, server: ServerInfo, clock: Callable[[], float], *, seed: int,
                 deployment_index: int = 0, request_timeout_s: float = 600.0,
                 on_first_token: Callable[[Request], None] | None = None,
                 on_tokens: Callable[[int], None] | None = None) -> None:
        self.client = client
        self.server = server
        self.clock = clock
        self.seed = seed
        self.deployment_index = deployment_index
        self.request_timeout_s = request_timeout_s
        self.on_first_token = on_first_token
        self.on_tokens = on_tokens
        self.tokens_generated = 0  # output tokens streamed by every request so far (reconciled with usage)
        self.token_times_s: dict[int, list[float]] = {}  # request id -> time of each streamed token

    def _count(self, n: int) -> None:
        if n:
            self.tokens_generated += n
            if self.on_tokens is not None:
                self.on_tokens(n)

    def _body(self, req: Request) -> dict:
        return {"model": self.server.model_id,
                "prompt": prompt_token_ids(self.seed, self.deployment_index, req.id, req.prompt_tokens),
                "max_tokens": req.output_tokens, "min_tokens": req.output_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    async def complete(self, req: Request) -> None:
        """Send ``req`` and stream its answer, filling its record. Never raises (except on cancellation):
        a failure leaves ``req.drop_reason`` set. ``req.arrival_s`` is left as the caller set it."""
        limit = self.server.max_model_len
        total = req.prompt_tokens + req.output_tokens
        if limit is not None and total > limit:
            req.drop_reason = f"too_long: prompt+output={total} exceeds max_model_len={limit}"
            return
        times = self.token_times_s.setdefault(req.id, [])
        try:
            await self._stream(req, times)
        except httpx.TimeoutException as exc:
            req.drop_reason = f"timeout: {type(exc).__name__} after {len(times)} tokens"
        except httpx.TransportError as exc:
            req.drop_reason = f"connection: {connection_reason(exc)} after {len(times)} tokens"
        except _BadResponse as exc:
            req.drop_reason = f"bad response: {exc}"
        except httpx.HTTPError as exc:  # anything else httpx raises (e.g. a malformed header)
            req.drop_reason = f"connection: {type(exc).__name__}: {exc}"
        if req.drop_reason:
            req.finish_s = float("nan")

    async def _stream(self, req: Request, times: list[float]) -> None:
        url = f"{self.server.url}/v1/completions"
        timeout = httpx.Timeout(self.request_timeout_s, connect=10.0)
        async with self.client.stream("POST", url, json=self._body(req), timeout=timeout) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                req.drop_reason = f"http {resp.status_code}: {_error_message(raw)}"
                return
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raw = (await resp.aread()).decode("utf-8", "replace")
                raise _BadResponse(f"expected a text/event-stream, got {ctype or 'no content type'}: {_quote(raw)}")
            counted = 0
            usage_tokens: int | None = None
            done = False
            async for line in resp.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    if line.startswith(("event:", "id:", "retry:")):
                        continue
                    raise _BadResponse(f"not a server-sent event line: {_quote(line)}")
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _BadResponse(f"non-JSON event data: {_quote(data)}") from None
                if not isinstance(chunk, dict):
                    raise _BadResponse(f"event data is not a JSON object: {_quote(data)}")
                if "error" in chunk or chunk.get("object") == "error":  # vLLM: {"object": "error", ...} or {"error"}
                    req.drop_reason = f"server error in stream after {counted} tokens: {_error_message(data)}"
                    return
                choices = chunk.get("choices")
                if choices:
                    now = self.clock()
                    if counted == 0:
                        req.first_token_s = now
                        if self.on_first_token is not None:
                            self.on_first_token(req)
                    counted += 1
                    times.append(now)
                    self._count(1)
                usage = chunk.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
            if not done:
                raise _BadResponse(f"the stream ended before [DONE], after {counted} tokens")
            finish = self.clock()
        generated = usage_tokens if usage_tokens is not None else counted
        self._count(generated - counted)  # a chunk may carry several tokens: usage is the true count
        if generated <= 0:
            raise _BadResponse("the server streamed no token")
        req.generated = generated
        req.finish_s = finish


def _error_message(raw: str) -> str:
    """The ``error.message`` of an OpenAI error body, or the body itself, quoted."""
    try:
        body = json.loads(raw)
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message") if isinstance(err, dict) else None
        if isinstance(msg, str) and msg:
            return msg[:_SHOWN]
    except ValueError:
        pass
    return _quote(raw) if raw.strip() else "(empty body)"
