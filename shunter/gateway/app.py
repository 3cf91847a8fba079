"""The gateway's HTTP API: the OpenAI routes proxied to backends, models, health, metrics, admin.

A generation request is read only as far as dispatch needs: its `model`
(which backends may take it), `stream`, `max_tokens` and the prompt's text
(`shunter.gateway.prompt`); its body then goes to the chosen backend as it
came. Errors are OpenAI-style bodies, as in serving mode (`shunter.server.errors`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

import shunter
from shunter.gateway.gateway import Gateway, NoBackendError, UnknownModelError
from shunter.gateway.prompt import prompt_token_ids
from shunter.gateway.proxy import forward
from shunter.request import Request as ShunterRequest, SamplingParams
from shunter.server.errors import OpenAIError, bad_request, install_handlers
from shunter.server.probes import install_probe_routes
from shunter.server.timeouts import BodyDeadline, ConnectionTimeouts
from shunter.server.security import AccessPolicy, GuardMiddleware

DEFAULT_MAX_TOKENS = 16  # what dispatch assumes when the body gives none (OpenAI's completions default)


@dataclass
class GatewayState:
    """What the handlers need: the gateway, access rules, the in-flight limit, whether it is closing."""

    gateway: Gateway
    access: AccessPolicy = field(default_factory=AccessPolicy)
    max_live_requests: int = 1024
    closing: Callable[[], bool] = lambda: False
    timeouts: ConnectionTimeouts = field(default_factory=ConnectionTimeouts)  # slow and idle clients


def build_app(state: GatewayState) -> FastAPI:
    """The FastAPI application over `state` (the caller starts and stops the gateway)."""
    gateway = state.gateway
    app = FastAPI(title="Shunter gateway", version=shunter.__version__, docs_url=None, redoc_url=None)
    count_error = lambda status: gateway.metrics.rejected.labels(str(status)).inc()  # noqa: E731
    install_handlers(app, on_error=count_error)
    app.add_middleware(BodyDeadline, timeout=state.timeouts.request_body)
    app.add_middleware(GuardMiddleware, policy=state.access, on_refusal=count_error)

    install_probe_routes(app, lambda: state.closing(),
                         lambda: None if gateway.ready_backends else "no backend is healthy", gateway.metrics.render)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "shunter"}
                                           for name in gateway.models]}

    async def generate(http: Request, path: str, is_chat: bool) -> Response:
        raw = await http.body()
        if len(raw) > state.access.max_body_bytes:  # sent without a Content-Length (chunked): checked once read
            raise OpenAIError(413, f"the request body has {len(raw)} bytes; the limit is {state.access.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise bad_request("model must be a string naming one of /v1/models", param="model")
        if state.closing():
            raise OpenAIError(503, "the gateway is shutting down: it takes no new requests")
        if gateway.num_live_requests >= state.max_live_requests:
            raise OpenAIError(429, f"the gateway has {state.max_live_requests} requests in flight, its limit; "
                                   f"retry shortly", "RateLimitError", None, "too_many_requests", {"Retry-After": "1"})
        return await relay(gateway, http, path, raw, body, is_chat, gateway.next_request_id())

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        return await generate(http, "/v1/completions", is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Response:
        return await generate(http, "/v1/chat/completions", is_chat=True)

    @app.get("/admin/instances")
    async def list_backends() -> dict:
        return {"instances": [b.describe() for b in gateway.backends.values()]}

    @app.post("/admin/instances/{instance_id}/drain")
    async def drain(instance_id: str) -> dict:
        try:
            return gateway.drain(instance_id).describe()
        except KeyError:
            raise OpenAIError(404, f"no backend {instance_id!r}", param="instance_id") from None

    return app


async def relay(gateway: Gateway, http: Request, path: str, raw: bytes, body: dict, is_chat: bool,
                request_id: str) -> Response:
    """Dispatch an admitted request among the backends serving its `model` (a string) and proxy `raw`, the
    body as the client sent it, there: 404 for a model no backend serves, 503 if none takes requests now."""
    model = body["model"]
    max_tokens = body.get("max_completion_tokens" if is_chat and "max_completion_tokens" in body else "max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS  # the backend judges the body; dispatch needs only a size
    request = ShunterRequest(request_id, prompt_token_ids(body, is_chat), SamplingParams(max_tokens=max_tokens),
                             arrival_time=time.monotonic())
    try:
        return await forward(gateway, http, path, model, raw, body.get("stream") is True, request)
    except UnknownModelError:
        raise OpenAIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model",
                          "model_not_found") from None
    except NoBackendError as exc:
        raise OpenAIError(503, str(exc)) from None
