"""Who may call what: API keys, the admin API's own key and reach, and the request-size limit.

A pure ASGI middleware in front of the app (cheaper than Starlette's
`BaseHTTPMiddleware`, and it leaves streaming untouched):

- `/v1/...` needs `Authorization: Bearer <api key>` when one is set (as
  vLLM's server does); `/health`, `/version` and `/metrics` stay open for
  probes and Prometheus.
- `/admin/...` needs the admin key when one is set, and answers only
  loopback clients unless the server was told otherwise.
- A body declared larger than the limit is refused with 413 before it is read.

Refusals carry OpenAI-style bodies and are counted like every other error.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Callable

from shunter.server.errors import OpenAIError


@dataclass(frozen=True)
class AccessPolicy:
    """api_key / admin_key: None leaves that API open. admin_remote: admit non-loopback admin clients."""

    api_key: str | None = None
    admin_key: str | None = None
    admin_remote: bool = False
    max_body_bytes: int = 4 << 20


class GuardMiddleware:
    """Applies an `AccessPolicy` to every HTTP request before the app sees it."""

    def __init__(self, app, policy: AccessPolicy, on_refusal: Callable[[int], None] = lambda status: None) -> None:
        self.app = app
        self.policy = policy
        self.on_refusal = on_refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                self.on_refusal(error.status)
                await _send_error(send, error)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> OpenAIError | None:
        path: str = scope["path"]
        headers = dict(scope.get("headers") or [])
        p = self.policy
        if path.startswith("/v1/") and p.api_key is not None and not _has_key(headers, p.api_key):
            return OpenAIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               "AuthenticationError", None, "invalid_api_key")
        if path.startswith("/admin"):
            client = (scope.get("client") or ("", 0))[0]
            if not p.admin_remote and not _is_loopback(client):
                return OpenAIError(403, "the admin API answers only on this machine (loopback)", "PermissionDenied")
            if p.admin_key is not None and not _has_key(headers, p.admin_key):
                return OpenAIError(401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'",
                                   "AuthenticationError", None, "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > p.max_body_bytes:
            return OpenAIError(413, f"the request body has {int(length)} bytes; the limit is {p.max_body_bytes}",
                               "RequestTooLarge")
        return None


def _has_key(headers: dict, key: str) -> bool:
    given = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = given.partition(" ")
    # Constant-time comparison: the answer's timing says nothing about the key.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _send_error(send, error: OpenAIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
