"""Proxying one OpenAI request to the backend dispatch picked: bodies and streams passed through unchanged.

- The client's body goes to the backend byte for byte; the backend's answer
  comes back byte for byte (a stream chunk by chunk, as it arrives), so
  streaming, usage and every field the backend supports pass through.
- A backend's 4xx goes to the client as it is; a 5xx becomes a 502 and a
  backend silent for `--backend-timeout` seconds a 504, with OpenAI-style bodies.
- A backend that refuses the connection or drops it (or fails its health
  check while the request waits) is taken out of dispatch, and the request,
  if nothing of its answer has reached the client yet, is sent once more to
  another backend (in a mixed server, maybe one of Shunter's own instances).
  A stream already started ends with an error event and `[DONE]`, never a hang.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Awaitable, Callable

import aiohttp
from fastapi.responses import Response

from shunter.gateway.gateway import Gateway
from shunter.gateway.remote import Call, RemoteBackend
from shunter.request import Request
from shunter.runtime.handles import InstanceHandle, NoInstanceError
from shunter.server.errors import OpenAIError

DISCONNECT_CHECK_S = 0.5  # how often a request waiting for its backend checks that its client is still there
JSON_HEADERS = {"Content-Type": "application/json"}
_USAGE = {key: re.compile(rb'"%s"\s*:\s*(\d+)' % key) for key in (b"prompt_tokens", b"completion_tokens")}
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"(\w+)"')
TAIL_BYTES = 4096  # the end of a stream kept to read its usage and finish reason


class _BackendLost(Exception):
    """The backend failed before any of the answer reached the client: the request may be retried elsewhere."""


async def forward(gateway: Gateway, http, path: str, model: str, body: bytes, stream: bool, request,
                  dispatch: Callable[[Request], InstanceHandle] | None = None,
                  serve_own: Callable[[InstanceHandle], Awaitable[Response]] | None = None) -> Response:
    """Dispatch `request` (the dispatch view of the body) and proxy `body` to the backend picked; once more
    elsewhere if that backend is lost before answering.

    `dispatch(request)` picks the instance and counts the request there (default: among `model`'s backends);
    NoInstanceError when none takes it. In a mixed server it may pick one of Shunter's own instances:
    `serve_own(handle)` answers the request there.
    """
    dispatch = dispatch or (lambda r: gateway.dispatch(model, r))
    failures = []
    for _ in range(2):
        try:
            handle = dispatch(request)
        except NoInstanceError:
            if not failures:
                raise
            break  # the backend that failed was the only one
        if not isinstance(handle, RemoteBackend):
            return await serve_own(handle)
        try:
            return await _attempt(gateway, http, handle, path, model, body, stream, request)
        except _BackendLost as exc:
            failures.append(str(exc))
            if len(failures) == 1:
                gateway.metrics.retries.labels(handle.instance_id).inc()
    raise OpenAIError(502, f"the request failed: {'; then '.join(failures)}")


async def _attempt(gateway: Gateway, http, backend: RemoteBackend, path: str, model: str, body: bytes, stream: bool,
                   request) -> Response:
    call = gateway.begin(backend, request)
    handed_over = False
    try:
        status, content_type, data = await _answer(gateway, http, backend, call, path, body, stream)
        if data is None:  # a stream, open: its relay owns the call from here
            handed_over = True
            return RelayResponse(_relay(gateway, backend, call, model), status,
                                 content_type or "text/event-stream")
        if status >= 500:
            gateway.metrics.backend_errors.labels(backend.instance_id, "status_5xx").inc()
            raise OpenAIError(502, f"backend {backend.instance_id} ({backend.url}) answered {status}: "
                                   f"{_message(data)}")
        if status < 400:
            _observe_whole(gateway, backend, call, model, data)
        return Response(data, status_code=status, media_type=content_type)
    finally:
        if not handed_over:
            gateway.end(backend, call)


async def _answer(gateway: Gateway, http, backend: RemoteBackend, call: Call, path: str, body: bytes,
                  stream: bool) -> tuple[int, str | None, bytes | None]:
    """(status, content type, body) from the backend; body None for a stream that opened (200)."""
    session = gateway.session
    url = backend.url + path

    async def whole():
        async with session.post(url, data=body, headers=JSON_HEADERS, timeout=gateway.request_timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), await resp.read()

    async def opened():
        resp = await session.post(url, data=body, headers=JSON_HEADERS, timeout=gateway.request_timeout)
        if resp.status != 200:
            try:
                return resp.status, resp.headers.get("Content-Type"), await resp.read()
            finally:
                resp.release()
        call.response = resp
        return resp.status, resp.headers.get("Content-Type"), None

    task = call.task = asyncio.ensure_future(opened() if stream else whole())
    try:
        # A task, so that a failed backend (`Call.cut`) or a client gone can end the wait.
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_CHECK_S)
            if not task.done() and await http.is_disconnected():
                raise OpenAIError(400, "the client disconnected")
        return task.result()
    except asyncio.CancelledError:
        if call.failure is None:
            raise  # the handler itself was cancelled
        raise _BackendLost(call.failure) from None
    except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
        _lose(gateway, backend, "connect", f"cannot connect: {exc}")
    except aiohttp.SocketTimeoutError:
        gateway.metrics.backend_errors.labels(backend.instance_id, "timeout").inc()
        raise OpenAIError(504, f"backend {backend.instance_id} ({backend.url}) sent nothing for "
                               f"{gateway.backend_timeout:g} s (--backend-timeout)") from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        _lose(gateway, backend, "disconnect", f"connection lost: {type(exc).__name__}: {exc}")
    finally:
        if not task.done():
            task.cancel()
        call.task = None


def _lose(gateway: Gateway, backend: RemoteBackend, kind: str, reason: str) -> None:
    gateway.metrics.backend_errors.labels(backend.instance_id, kind).inc()
    gateway.fail(backend, reason)
    raise _BackendLost(f"backend {backend.instance_id} ({backend.url}): {reason}")


async def _relay(gateway: Gateway, backend: RemoteBackend, call: Call, model: str):
    """The backend's stream, chunk by chunk; an error event and `[DONE]` if the backend fails mid-stream."""
    metrics = gateway.metrics
    resp = call.response
    engine = backend.instance_id
    arrival = call.request.arrival_time
    last = None
    tail = b""
    num_events = 0
    finished = False
    try:
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            if last is None:
                metrics.ttft.labels(model, engine).observe(now - arrival)
                gateway.prefilled(backend, call)
            else:
                metrics.itl.labels(model, engine).observe(now - last)
            last = now
            num_events += chunk.count(b"data:")
            tail = (tail + chunk)[-TAIL_BYTES:]
            yield chunk
        if call.failure is not None:
            raise aiohttp.ClientConnectionError(call.failure)
        finished = True
    except aiohttp.SocketTimeoutError:
        metrics.backend_errors.labels(engine, "timeout").inc()
        yield _error_event(tail, 504, f"backend {engine} ({backend.url}) sent nothing for "
                                      f"{gateway.backend_timeout:g} s (--backend-timeout)")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        if call.failure is None:
            metrics.backend_errors.labels(engine, "disconnect").inc()
            gateway.fail(backend, f"connection lost mid-stream: {type(exc).__name__}: {exc}")
        yield _error_event(tail, 502, f"the stream broke off: {call.failure or exc}")
    finally:
        resp.release() if finished else resp.close()  # close: a client gone mid-stream aborts it on the backend
        gateway.end(backend, call)
        usage = {k.decode(): int(m[-1]) for k, p in _USAGE.items() if (m := p.findall(tail))}
        reasons = _FINISH.findall(tail)
        # Without `usage` (the client did not ask for it) the events stand in for tokens (minus `[DONE]`).
        metrics.observe_finish(engine, usage.get("prompt_tokens", call.request.num_prompt_tokens),
                               time.monotonic() - arrival,
                               reasons[-1].decode() if reasons else "abort" if not finished else "unknown", model)
        metrics.generation_tokens.labels(model, engine).inc(usage.get("completion_tokens", max(0, num_events - 1)))


class RelayResponse(Response):
    """A stream relayed chunk by chunk, written straight to the ASGI `send`.

    Not Starlette's StreamingResponse: that one runs a task group per response
    to watch for a disconnect, which costs a proxy more than the relaying
    itself. Here the client is checked between chunks every
    `DISCONNECT_CHECK_S`; once it is gone the relay stops (closing the backend
    connection, which aborts the request there).
    """

    def __init__(self, chunks, status: int, media_type: str) -> None:
        # Not Response.__init__: it would declare the empty body's length.
        self.chunks = chunks
        self.status_code = status
        self.media_type = media_type
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode("latin-1"))]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        next_check = time.monotonic() + DISCONNECT_CHECK_S
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if time.monotonic() >= next_check:
                    if await _is_disconnected(receive):
                        return
                    next_check = time.monotonic() + DISCONNECT_CHECK_S
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.chunks.aclose()


async def _is_disconnected(receive) -> bool:
    """Whether the client has gone, without waiting: once the body is read, `receive` returns only on a disconnect."""
    task = asyncio.ensure_future(receive())
    await asyncio.sleep(0)  # the task's first step runs before this resumes
    if task.done():
        return task.result()["type"] == "http.disconnect"
    task.cancel()
    return False


def _observe_whole(gateway: Gateway, backend: RemoteBackend, call: Call, model: str, data: bytes) -> None:
    usage = {k.decode(): int(m[-1]) for k, p in _USAGE.items() if (m := p.findall(data[-TAIL_BYTES:]))}
    reasons = _FINISH.findall(data)
    engine = backend.instance_id
    gateway.metrics.observe_finish(engine, usage.get("prompt_tokens", call.request.num_prompt_tokens),
                                   time.monotonic() - call.request.arrival_time,
                                   reasons[-1].decode() if reasons else "unknown", model)
    gateway.metrics.generation_tokens.labels(model, engine).inc(usage.get("completion_tokens", 0))


def _error_event(tail: bytes, status: int, message: str) -> bytes:
    """An OpenAI-style error event and `[DONE]`, after whatever partial event the backend left unfinished."""
    sep = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    body = OpenAIError(status, message).body()
    return sep + b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"


def _message(data: bytes) -> str:
    """The backend's own error message, if its body has one (else the start of the body)."""
    try:
        error = json.loads(data).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return data[:200].decode("utf-8", "replace") or "(no body)"
