"""The vLLM driver against small aiohttp servers: a well-behaved streaming server (records, request body),
and garbage (HTTP 500, non-JSON events, a non-SSE body, a stream cut before [DONE], a bad model list, a server
that is down): every failure is a dropped request with a reason, or one clear ``EngineError``."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from hil.engine import PROMPT_TOKEN_ID_RANGE, EngineDriver, EngineError, probe_server, prompt_token_ids
from sim.workload import Request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    """A TCP port nobody listens on (just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def models_ok(_request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 1000}]})


async def _sse(request: web.Request, chunks: list[str]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks:
        await resp.write(c.encode())
        await asyncio.sleep(0.001)
    return resp


def good_completions(seen: list[dict]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        n = body["max_tokens"]
        chunks = [f"data: {json.dumps({'choices': [{'index': 0, 'text': ' tok'}]})}\n\n" for _ in range(n)]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": len(body["prompt"]) + n}
        chunks.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n")
        chunks.append("data: [DONE]\n\n")
        return await _sse(request, chunks)
    return handler


async def with_server(completions: Handler, models: Handler, body: Callable[[str], Awaitable[None]]) -> None:
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # port 0: the system picks a free one, no race
    await site.start()
    port = runner.addresses[0][1]
    try:
        await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


async def drive(url: str, requests: list[Request], timeout_s: float = 5.0) -> EngineDriver:
    async with httpx.AsyncClient() as client:
        server = await probe_server(client, url)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        driver = EngineDriver(client, server, lambda: loop.time() - t0, seed=3, request_timeout_s=timeout_s)
        await asyncio.gather(*(driver.complete(r) for r in requests))
        return driver


def test_streamed_request_is_timed_and_sent_as_vllm_expects() -> None:
    seen: list[dict] = []
    reqs = [Request(i, 0.0, 20 + i, 5 + i, "d") for i in range(3)]

    async def body(url: str) -> None:
        driver = await drive(url, reqs)
        assert driver.tokens_generated == sum(r.output_tokens for r in reqs)
        for r in reqs:
            times = driver.token_times_s[r.id]
            assert len(times) == r.output_tokens
            assert r.first_token_s == times[0] and times == sorted(times) and r.finish_s >= times[-1]

    asyncio.run(with_server(good_completions(seen), models_ok, body))
    for r in reqs:
        assert r.drop_reason == "" and r.generated == r.output_tokens
    by_len = {len(b["prompt"]): b for b in seen}
    for r in reqs:
        b = by_len[r.prompt_tokens]
        assert b["model"] == "m" and b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == b["min_tokens"] == r.output_tokens and b["ignore_eos"] is True
        assert b["prompt"] == prompt_token_ids(3, 0, r.id, r.prompt_tokens)
        assert all(PROMPT_TOKEN_ID_RANGE[0] <= t < PROMPT_TOKEN_ID_RANGE[1] for t in b["prompt"])


def test_prompt_ids_are_deterministic() -> None:
    assert prompt_token_ids(1, 0, 5, 50) == prompt_token_ids(1, 0, 5, 50)
    assert prompt_token_ids(1, 0, 5, 50) != prompt_token_ids(2, 0, 5, 50)
    assert len(prompt_token_ids(1, 0, 6, 7)) == 7


async def http_500(_request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "engine crashed", "type": "internal", "code": 500}}, status=500)


async def non_json_events(request: web.Request) -> web.StreamResponse:
    return await _sse(request, ["data: {\"choices\": [{\"text\": \"a\"}]}\n\n", "data: <html>oops</html>\n\n"])


async def not_sse(_request: web.Request) -> web.Response:
    return web.Response(text="<html>proxy error page</html>", content_type="text/html")


async def cut_stream(request: web.Request) -> web.StreamResponse:
    chunk = "data: {\"choices\": [{\"text\": \"a\"}]}\n\n"
    return await _sse(request, [chunk, chunk])  # no usage, no [DONE]


async def error_chunk(request: web.Request) -> web.StreamResponse:
    chunk = "data: {\"choices\": [{\"text\": \"a\"}]}\n\n"
    err = json.dumps({"object": "error", "message": "out of KV cache", "type": "InternalServerError", "code": 500})
    return await _sse(request, [chunk, f"data: {err}\n\n", "data: [DONE]\n\n"])


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(1.0)
    return await _sse(request, ["data: [DONE]\n\n"])


async def reset(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: {\"choices\": [{\"text\": \"a\"}]}\n\n")
    request.transport.abort()  # the server dies mid-stream
    return resp


@pytest.mark.parametrize(("handler", "reason"), [
    (http_500, "http 500: engine crashed"),
    (non_json_events, "bad response: non-JSON event data"),
    (not_sse, "bad response: expected a text/event-stream"),
    (cut_stream, "bad response: the stream ended before [DONE], after 2 tokens"),
    (error_chunk, "server error in stream after 1 tokens: out of KV cache"),
    (slow, "timeout:"),
    (reset, "connection:"),
])
def test_garbage_becomes_a_dropped_request_with_its_reason(handler: Handler, reason: str) -> None:
    reqs = [Request(0, 0.0, 10, 4, "d"), Request(1, 0.0, 10, 4, "d")]

    async def body(url: str) -> None:
        await drive(url, reqs, timeout_s=0.3)

    asyncio.run(with_server(handler, models_ok, body))
    for r in reqs:
        assert r.drop_reason.startswith(reason), r.drop_reason


def test_too_long_requests_are_dropped_without_sending() -> None:
    seen: list[dict] = []
    reqs = [Request(0, 0.0, 990, 20, "d")]  # the server's max_model_len is 1000

    async def body(url: str) -> None:
        await drive(url, reqs)

    asyncio.run(with_server(good_completions(seen), models_ok, body))
    assert reqs[0].drop_reason == "too_long: prompt+output=1010 exceeds max_model_len=1000" and not seen


async def models_garbage(_request: web.Request) -> web.Response:
    return web.Response(text="not json at all")


async def models_500(_request: web.Request) -> web.Response:
    return web.Response(text="boom", status=500)


@pytest.mark.parametrize(("models", "message"), [
    (models_garbage, "GET /v1/models did not return an OpenAI model list"),
    (models_500, "GET /v1/models answered HTTP 500"),
])
def test_a_server_that_is_not_vllm_is_a_clear_error(models: Handler, message: str) -> None:
    async def body(url: str) -> None:
        with pytest.raises(EngineError, match=message):
            await drive(url, [])

    asyncio.run(with_server(good_completions([]), models, body))


def test_server_down_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        await drive(url, [])

    with pytest.raises(EngineError, match=r"cannot reach vLLM at http://127\.0\.0\.1:\d+: connection refused"):
        asyncio.run(main())
