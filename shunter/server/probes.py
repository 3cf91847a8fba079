"""The routes every Shunter HTTP app has for probes and scrapers: /health, /version, /metrics (torch-free)."""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI
from fastapi.responses import Response

import shunter
from shunter.server.errors import OpenAIError
from shunter.server.metrics import CONTENT_TYPE


def install_probe_routes(app: FastAPI, closing: Callable[[], bool], not_ready: Callable[[], str | None],
                         render_metrics: Callable[[], bytes]) -> None:
    """/health: 200, or 503 while shutting down or while `not_ready()` gives a reason; /version; /metrics."""

    @app.get("/health")
    async def health() -> Response:
        if closing():
            raise OpenAIError(503, "the server is shutting down")
        problem = not_ready()
        if problem is not None:
            raise OpenAIError(503, problem)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": shunter.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE)
