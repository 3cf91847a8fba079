"""The HTTP API: OpenAI completions and chat (streamed or not), models, health, metrics, admin.

Handlers check and tokenize a request, hand it to the `Frontend` for dispatch,
and turn its stream of token events into text (incrementally detokenized here,
stop strings matched here) and into OpenAI's response or SSE chunks. A client
that goes away mid-request has its request aborted on the instance that owns
it; nothing is allocated anywhere for a request that fails its checks.

A mixed server (`ServerState.gateway`: remote backends beside the own
instances) checks and tokenizes a request for the own instances' model all
the same, and the one dispatch policy picks among own instances and the
backends serving that model: a backend picked gets the body as the client
sent it (`shunter.gateway.proxy`). A request for a model only backends serve
is proxied as in gateway mode (the backend judges it).
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
from shunter.gateway.app import relay
from shunter.gateway.gateway import Gateway
from shunter.gateway.proxy import forward
from shunter.gateway.remote import NO_MIGRATION, RemoteBackend
from shunter.runtime.handles import InstanceHandle
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
    gateway: Gateway | None = None  # remote backends beside the own instances (a mixed server)

    @property
    def model_names(self) -> list[str]:
        """Every model served: the own instances' names, then the backends' other ones."""
        return self.served_model_names + [m for m in self.remote_models if m not in self.served_model_names]

    @property
    def remote_models(self) -> list[str]:
        return self.gateway.models if self.gateway is not None else []

    def num_live_requests(self) -> int:
        return self.frontend.num_live_requests() + (self.gateway.num_live_requests if self.gateway else 0)

    def backend(self, instance_id: str) -> RemoteBackend | None:
        return self.gateway.backends.get(instance_id) if self.gateway is not None else None


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application over `state` (the caller starts and stops the frontend)."""
    app = FastAPI(title="Shunter", version=shunter.__version__, docs_url=None, redoc_url=None)
    app.state.shunter = state
    count_error = lambda status: state.frontend.metrics.rejected.labels(str(status)).inc()  # noqa: E731
    install_handlers(app, on_error=count_error)
    app.add_middleware(GuardMiddleware, policy=state.access, on_refusal=count_error)
    app.add_middleware(BodyDeadline, timeout=state.timeouts.request_body)

    def not_ready() -> str | None:
        if state.frontend.ready_instances or (state.gateway is not None and state.gateway.ready_backends):
            return None
        return "no instance is ready"

    install_probe_routes(app, lambda: state.closing(), not_ready, state.frontend.metrics.render)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "shunter", "root": state.served_model_names[0],
             "max_model_len": state.max_model_len} for name in state.served_model_names] + [
            {"id": name, "object": "model", "created": 0, "owned_by": "shunter"}
            for name in state.model_names[len(state.served_model_names):]]}

    @app.post("/v1/completions", openapi_extra={"requestBody": protocol.openapi_body(CompletionRequest)})
    async def completions(request: Request) -> Response:
        return await _serve(request, state, chat=False)

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": protocol.openapi_body(ChatCompletionRequest)})
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, state, chat=True)

    @app.get("/admin/instances")
    async def list_instances() -> dict:
        backends = state.gateway.backends.values() if state.gateway is not None else ()
        return {"instances": [h.describe() for h in [*state.frontend.handles.values(), *backends]]}

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
        backend = state.backend(instance_id)
        try:
            handle = backend or frontend.get_handle(instance_id)
        except UnknownInstanceError:
            raise OpenAIError(404, f"no instance {instance_id!r}", param="instance_id") from None
        schedulers = state.gateway.schedulers_of(backend) if backend else [frontend.scheduler_for(handle)]
        if any([i.instance_id for i in s.taking_work] == [instance_id] for s in schedulers):
            raise OpenAIError(409, f"instance {instance_id} is the last {handle.role} instance taking work: "
                                   f"add one before draining it", "ConflictError", "instance_id")
        # A backend stops once its requests end (they cannot move); an own instance's requests migrate away.
        return (state.gateway.drain(instance_id) if backend else frontend.drain(instance_id)).describe()

    @app.get("/admin/requests")
    async def list_requests() -> dict:
        calls = [(b, call) for b in state.gateway.backends.values() for call in b.calls.values()] \
            if state.gateway is not None else []
        return {"requests": [{"id": rid, "instance": s.instance_id, "num_output_tokens": s.next_index,
                              "migrating": state.frontend.migrations.is_busy(rid)}
                             for rid, s in state.frontend.streams.items()] + [
                            {"id": call.request.request_id, "instance": b.instance_id, "num_output_tokens": None,
                             "migrating": False} for b, call in calls]}

    @app.post("/admin/requests/{request_id}/migrate")
    async def migrate(request_id: str, request: Request) -> dict:
        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("to"), str):
            raise bad_request('the body must be {"to": "<instance id>"}', param="to")
        _refuse_remote_migration(state, request_id, body["to"])
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


async def _read(request: Request, max_bytes: int = 4 << 20) -> bytes:
    # Read in chunks: a body sent without a Content-Length (chunked) is refused as soon as it passes the
    # limit, not held in memory whole (the rest is not read: the connection is closed).
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIError(413, f"the request body has more than {max_bytes} bytes, the limit",
                              headers={"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def _json(request: Request, max_bytes: int = 4 << 20) -> Any:
    return _parse_json(await _read(request, max_bytes))


def _admit(state: ServerState) -> None:
    """503 while shutting down; 429 at the in-flight limit."""
    if state.closing():
        raise OpenAIError(503, "the server is shutting down: it takes no new requests")
    if state.num_live_requests() >= state.max_live_requests:
        raise OpenAIError(429, f"the server has {state.max_live_requests} requests in flight, its limit; "
                               f"retry shortly", "RateLimitError", None, "too_many_requests", {"Retry-After": "1"})


def _path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


async def _serve(http: Request, state: ServerState, chat: bool) -> Response:
    """A completion or chat request: checked, tokenized and generated (or proxied: `_relay`, `_generate`)."""
    raw = await _read(http, state.access.max_body_bytes)
    body = _parse_json(raw)
    if _is_remote_only(state, body):
        return await _relay(http, state, raw, body, chat)
    req = protocol.parse(ChatCompletionRequest if chat else CompletionRequest, body)
    protocol.check_model(req.model, state.model_names)
    if chat:
        messages = protocol.chat_messages(req)
        try:
            prompt_ids = state.tokenizer.apply_chat_template(messages)
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    else:
        prompt = protocol.completion_prompt(req)
        if isinstance(prompt, str):
            prompt_ids = state.tokenizer.encode(prompt)
        else:
            if any(t < 0 or t >= state.tokenizer.vocab_size for t in prompt):
                raise bad_request(f"prompt token ids must lie in [0, {state.tokenizer.vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        max_tokens = req.max_tokens
    return await _generate(http, state, protocol.generation(req, max_tokens), prompt_ids, chat, raw)


def _is_remote_only(state: ServerState, body: Any) -> bool:
    """Whether the body names a model that only remote backends serve (a mixed server)."""
    model = body.get("model") if isinstance(body, dict) else None
    return isinstance(model, str) and model not in state.served_model_names and model in state.remote_models


async def _relay(http: Request, state: ServerState, raw: bytes, body: dict, chat: bool) -> Response:
    """A request for a model only backends serve: proxied as the gateway does (the backend judges the body)."""
    _admit(state)
    return await relay(state.gateway, http, _path(chat), raw, body, chat, state.gateway.next_request_id())


def _refuse_remote_migration(state: ServerState, request_id: str, dst_id: str) -> None:
    """409 for a migration from or to a remote backend, naming why."""
    found = state.gateway.find_call(request_id) if state.gateway is not None else None
    if found is not None:
        backend = found[0]
        raise OpenAIError(409, f"request {request_id!r} runs on remote backend {backend.instance_id} "
                               f"({backend.url}): {NO_MIGRATION}", "ConflictError", "request_id")
    backend = state.backend(dst_id)
    if backend is not None and request_id in state.frontend.streams:  # (an unknown request is a 404 first)
        raise OpenAIError(409, f"instance {dst_id} is a remote backend ({backend.url}): {NO_MIGRATION}",
                          "ConflictError", "to")


async def _generate(http: Request, state: ServerState, gen: Generation, prompt_ids: list[int], chat: bool,
                    raw: bytes) -> Response:
    """Check the lengths, dispatch, and answer streamed or whole (or, picked by dispatch in a mixed server,
    proxy `raw` to a remote backend)."""
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
    _admit(state)
    frontend = state.frontend
    request = frontend.new_request(prompt_ids, params, gen.priority)

    def dispatch(r) -> InstanceHandle:
        try:
            return frontend.dispatch(r)
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    async def answer_here(handle: InstanceHandle) -> Response:
        stream = frontend.streams[request.request_id]
        answer = _Answer(state, gen, request.request_id, n, chat, params.stop)
        if gen.stream:
            return StreamingResponse(answer.sse(stream), media_type="text/event-stream")
        return JSONResponse(await answer.whole(stream, http))

    try:
        if state.gateway is None:
            return await answer_here(dispatch(request))
        return await forward(state.gateway, http, _path(chat), state.served_model_names[0], raw, gen.stream,
                             request, dispatch, answer_here)
    except NoInstanceError as exc:
        raise OpenAIError(503, f"no instance can take the request: {exc}") from None


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
