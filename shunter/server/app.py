"""The HTTP API: OpenAI completions and chat (streamed or not), models, health, metrics, admin.

Handlers check and tokenize a request, hand it to the `Frontend` for dispatch,
and turn its stream of token events into text (incrementally detokenized here,
stop strings matched here) and into OpenAI's response or SSE chunks. A client
that goes away mid-request has its request aborted on the instance that owns
it; nothing is allocated anywhere for a request that fails its checks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import shunter
from shunter.model.tokenizer import Tokenizer
from shunter.server import protocol
from shunter.server.errors import OpenAIError, bad_request, install_handlers
from shunter.cluster.migration import MigrationRefused
from shunter.server.frontend import Frontend, NoInstanceError, UnknownInstanceError, UnknownRequestError
from shunter.server.probes import install_probe_routes
from shunter.server.protocol import ChatCompletionRequest, CompletionRequest, Generation
from shunter.server.security import AccessPolicy, GuardMiddleware
from shunter.server.timeouts import BodyDeadline, ConnectionTimeouts

DISCONNECT_CHECK_S = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class ServerState:
    """What the handlers need: the frontend, the tokenizer, the served model's names and context.

    max_live_requests: requests in flight at most; beyond it new ones get 429 (memory stays bounded
    under any burst, and admitted requests are not slowed down by ever more queued ones).
    """

    frontend: Frontend
    tokenizer: Tokenizer
    served_model_names: list[str]
    max_model_len: int
    access: AccessPolicy = field(default_factory=AccessPolicy)
    timeouts: ConnectionTimeouts = field(default_factory=ConnectionTimeouts)
    max_live_requests: int = 1024
    closing: Callable[[], bool] = lambda: False  # the server is shutting down: no new work


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application over `state` (the caller starts and stops the frontend)."""
    app = FastAPI(title="Shunter", version=shunter.__version__, docs_url=None, redoc_url=None)
    app.state.shunter = state
    count_error = lambda status: state.frontend.metrics.rejected.labels(str(status)).inc()  # noqa: E731
    install_handlers(app, on_error=count_error)
    app.add_middleware(GuardMiddleware, policy=state.access, on_refusal=count_error)
    app.add_middleware(BodyDeadline, timeout=state.timeouts.request_body)

    install_probe_routes(app, lambda: state.closing(),
                         lambda: None if state.frontend.ready_instances else "no instance is ready",
                         state.frontend.metrics.render)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "shunter", "root": state.served_model_names[0],
             "max_model_len": state.max_model_len} for name in state.served_model_names]}

    @app.post("/v1/completions", openapi_extra={"requestBody": protocol.openapi_body(CompletionRequest)})
    async def completions(request: Request) -> Response:
        req = protocol.parse(CompletionRequest, await _json(request, state.access.max_body_bytes))
        protocol.check_model(req.model, state.served_model_names)
        prompt = protocol.completion_prompt(req)
        if isinstance(prompt, str):
            prompt_ids = state.tokenizer.encode(prompt)
        else:
            if any(t < 0 or t >= state.tokenizer.vocab_size for t in prompt):
                raise bad_request(f"prompt token ids must lie in [0, {state.tokenizer.vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        gen = protocol.generation(req, req.max_tokens)
        return await _generate(request, state, gen, prompt_ids, chat=False)

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": protocol.openapi_body(ChatCompletionRequest)})
    async def chat_completions(request: Request) -> Response:
        req = protocol.parse(ChatCompletionRequest, await _json(request, state.access.max_body_bytes))
        protocol.check_model(req.model, state.served_model_names)
        messages = protocol.chat_messages(req)
        try:
            prompt_ids = state.tokenizer.apply_chat_template(messages)
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen = protocol.generation(req, max_tokens)
        return await _generate(request, state, gen, prompt_ids, chat=True)

    @app.get("/admin/instances")
    async def list_instances() -> dict:
        return {"instances": [h.describe() for h in state.frontend.handles.values()]}

    @app.post("/admin/instances", status_code=201)
    async def add_instance(request: Request) -> dict:
        raw = await request.body()
        body = await _json(request) if raw.strip() else {}
        role = body.get("role", "decode" if state.frontend.pd else "mixed") if isinstance(body, dict) else None
        roles = ("prefill", "decode") if state.frontend.pd else ("mixed",)
        if role not in roles:
            raise bad_request(f"role must be one of {', '.join(roles)}, got {role!r}", param="role")
        try:
            handle = await state.frontend.add_instance(role)
        except Exception as exc:
            raise OpenAIError(500, f"the new instance failed to start: {type(exc).__name__}: {exc}") from None
        return handle.describe()

    @app.post("/admin/instances/{instance_id}/drain")
    async def drain(instance_id: str) -> dict:
        frontend = state.frontend
        try:
            handle = frontend.get_handle(instance_id)
        except UnknownInstanceError:
            raise OpenAIError(404, f"no instance {instance_id!r}", param="instance_id") from None
        if [h.instance_id for h in frontend.ready_instances if h.role == handle.role] == [instance_id]:
            raise OpenAIError(409, f"instance {instance_id} is the last {handle.role} instance taking work: "
                                   f"add one before draining it", "ConflictError", "instance_id")
        return frontend.drain(handle.instance_id).describe()

    @app.get("/admin/requests")
    async def list_requests() -> dict:
        return {"requests": [{"id": rid, "instance": s.instance_id, "num_output_tokens": s.next_index,
                              "migrating": state.frontend.migrations.is_busy(rid)}
                             for rid, s in state.frontend.streams.items()]}

    @app.post("/admin/requests/{request_id}/migrate")
    async def migrate(request_id: str, request: Request) -> dict:
        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("to"), str):
            raise bad_request('the body must be {"to": "<instance id>"}', param="to")
        try:
            m = await state.frontend.migrate(request_id, body["to"])
        except UnknownRequestError:
            raise OpenAIError(404, f"no live request {request_id!r}", param="request_id") from None
        except UnknownInstanceError:
            raise OpenAIError(404, f"no instance {body['to']!r}", param="to") from None
        except MigrationRefused as exc:
            raise OpenAIError(409, str(exc), "ConflictError", "to") from None
        return m.to_json()

    return app


async def _json(request: Request, max_bytes: int = 4 << 20) -> Any:
    # Read in chunks: a body sent without a Content-Length (chunked) is refused as soon as it passes the
    # limit, not held in memory whole (the rest is not read: the connection is closed).
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIError(413, f"the request body has more than {max_bytes} bytes, the limit",
                              headers={"Connection": "close"})
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def _generate(http: Request, state: ServerState, gen: Generation, prompt_ids: list[int], chat: bool) -> Response:
    """Check the lengths, dispatch, and answer streamed or whole."""
    n = len(prompt_ids)
    if n >= state.max_model_len:
        raise bad_request(f"the prompt has {n} tokens; this model's context is {state.max_model_len} tokens "
                          f"(at least one must be left for the output)", param="messages" if chat else "prompt")
    params = gen.params
    if not gen.max_tokens_given:
        params.max_tokens = state.max_model_len - n
    elif n + params.max_tokens > state.max_model_len:
        raise bad_request(f"max_tokens {params.max_tokens} + prompt of {n} tokens exceeds this model's context of "
                          f"{state.max_model_len} tokens", param="max_tokens")
    if state.closing():
        raise OpenAIError(503, "the server is shutting down: it takes no new requests")
    if state.frontend.num_live_requests() >= state.max_live_requests:
        raise OpenAIError(429, f"the server has {state.max_live_requests} requests in flight, its limit; "
                               f"retry shortly", "RateLimitError", None, "too_many_requests", {"Retry-After": "1"})
    try:
        stream = state.frontend.submit(prompt_ids, params, gen.priority)
    except NoInstanceError as exc:
        raise OpenAIError(503, f"no instance can take the request: {exc}") from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    answer = _Answer(state, gen, stream.request_id, n, chat, params.stop)
    if gen.stream:
        return StreamingResponse(answer.sse(stream), media_type="text/event-stream")
    return JSONResponse(await answer.whole(stream, http))


class _Answer:
    """Turns one request's token events into text and into OpenAI's response objects."""

    def __init__(self, state: ServerState, gen: Generation, request_id: str, num_prompt_tokens: int, chat: bool,
                 stop: list[str]) -> None:
        self.state = state
        self.gen = gen
        self.request_id = request_id
        self.chat = chat
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = 0
        self.created = int(time.time())
        self.detok = state.tokenizer.detokenizer(stop)
        self.object = "chat.completion" if chat else "text_completion"
        self._chunk_prefix: str | None = None

    async def _texts(self, stream) -> AsyncIterator[tuple[str, str | None, str | None]]:
        """(new text, finish reason, error) as events arrive; the request is aborted if the caller stops early."""
        frontend = self.state.frontend
        done = False
        try:
            async for event in frontend.events(stream):
                self.num_tokens += len(event.token_ids)
                delta = self.detok.add_tokens(event.token_ids)
                text, reason = delta.text, event.finish_reason
                if delta.stopped:
                    if reason is None:
                        frontend.finish_stopped(self.request_id)
                    reason = "stop"  # the stop string came first, even in the request's last tokens
                if reason is not None:
                    done = True
                    if not delta.stopped:
                        text += self.detok.flush()
                    yield text, reason, event.error
                    return
                if text:
                    yield text, None, None
        finally:
            if not done:
                frontend.abort(self.request_id)  # client gone or handler cancelled

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_tokens}

    async def _collect(self, stream) -> tuple[str, str | None, str | None]:
        parts: list[str] = []
        reason = error = None
        async for text, reason, error in self._texts(stream):
            parts.append(text)
        return "".join(parts), reason, error

    async def whole(self, stream, http: Request) -> dict:
        # The collection runs as a task so that a client gone mid-request cancels it (aborting the request).
        task = asyncio.ensure_future(self._collect(stream))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_CHECK_S)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    raise OpenAIError(400, "the client disconnected")
        finally:
            if not task.done():
                task.cancel()
        text, reason, error = task.result()
        if error is not None or reason == "error":
            raise OpenAIError(500, f"the request failed: {error or 'instance error'}")
        choice = {"index": 0, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {"id": self.request_id, "object": self.object, "created": self.created, "model": self.gen.model,
                "choices": [choice], "usage": self.usage()}

    def _chunk(self, text: str | None, reason: str | None, first: bool = False) -> str:
        # Built from a per-request prefix: one json.dumps of the text per chunk, not of the whole object.
        if self._chunk_prefix is None:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            self._chunk_prefix = (f'data: {{"id":{json.dumps(self.request_id)},"object":"{obj}",'
                                  f'"created":{self.created},"model":{json.dumps(self.gen.model)},'
                                  f'"choices":[{{"index":0,')
        finish = "null" if reason is None else json.dumps(reason)
        if self.chat:
            if first:
                delta = '{"role":"assistant","content":""}'
            else:
                delta = "{}" if text is None else f'{{"content":{json.dumps(text)}}}'
            body = f'"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}'
        else:
            body = f'"text":{json.dumps(text or "")},"logprobs":null,"finish_reason":{finish}}}]}}'
        return self._chunk_prefix + body + "\n\n"

    async def sse(self, stream) -> AsyncIterator[str]:
        # Chat's role chunk goes out with the first tokens, as vLLM's does: a client timing its
        # first chunk measures the time to the first token, not to the request's acceptance.
        role = self._chunk(None, None, first=True) if self.chat else ""
        async for text, reason, error in self._texts(stream):
            if error is not None or reason == "error":
                yield role + _sse(OpenAIError(500, f"the request failed: {error or 'instance error'}").body())
                role = ""
                break
            out = role + (self._chunk(text, None) if text else "")
            if reason is not None:
                out += self._chunk(None if self.chat else "", reason)
            role = ""
            if out:
                yield out
        if self.gen.include_usage:
            yield _sse({"id": self.request_id, "object": "chat.completion.chunk" if self.chat else self.object,
                        "created": self.created, "model": self.gen.model, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
