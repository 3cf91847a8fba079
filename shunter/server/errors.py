"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Handlers for FastAPI turn every failure into such a body: malformed JSON,
validation errors, unknown routes, and anything unexpected (logged here,
answered with a 500 that carries no traceback or file path).
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDenied", 404: "NotFoundError",
          405: "MethodNotAllowed", 408: "RequestTimeout",
          409: "ConflictError", 413: "RequestTooLarge", 429: "RateLimitError", 502: "BadGatewayError",
          503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}


class OpenAIError(Exception):
    """An error the client caused or must know about, answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "InternalServerError")
        self.param = param
        self.code = code if code is not None else status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "BadRequestError", param, 400)


def install_handlers(app: FastAPI, on_error: Callable[[int], None] = lambda status: None) -> None:
    """Answer every error in OpenAI's shape; `on_error(status)` counts each (the rejection metric)."""

    def answer(exc: OpenAIError) -> JSONResponse:
        on_error(exc.status)
        return exc.response()

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        return answer(bad_request(f"invalid request: {err['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return answer(OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(OpenAIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                  "InternalServerError"))
