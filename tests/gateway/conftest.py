"""Gateways on 127.0.0.1 in front of null backends (`null_backend`, in tests/conftest.py). No model anywhere."""

from __future__ import annotations

import openai
import pytest

from shunter.cluster.bundles import build_policy
from shunter.gateway.backends import BackendSpec
from shunter.gateway.server import GatewayServer, GatewaySettings


@pytest.fixture
def start_gateway():
    """start_gateway(urls, dispatch="rr", **GatewaySettings fields) -> a running GatewayServer, stopped after."""
    servers = []

    def start(urls, dispatch: str = "round-robin", **settings) -> GatewayServer:
        settings.setdefault("control_interval", 0.02)
        specs = [u if isinstance(u, BackendSpec) else BackendSpec(u) for u in urls]
        server = GatewayServer(GatewaySettings(port=0, **settings), specs,
                               build_policy("rr", dispatch=dispatch, migration="none"))
        servers.append(server)
        return server.start_in_thread(timeout=30)

    yield start
    for server in servers:
        server.stop(timeout=10)


def client(server: GatewayServer, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
