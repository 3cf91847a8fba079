"""Suite-wide settings and fixtures."""

import pytest
from hypothesis import HealthCheck, settings

from shunter.bench.null_openai_server import NullServer, NullServerConfig

# Property tests assert behaviour, not speed: on a 2-core machine shared with other processes, input
# generation can be slow, and a health check failing on that says nothing about the code under test.
settings.register_profile("shunter", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shunter")


@pytest.fixture
def null_backend():
    """null_backend(port=0, **NullServerConfig fields) -> a running NullServer, stopped after the test: a tiny
    OpenAI server that answers at once (`shunter.bench.null_openai_server`) and exposes vLLM-style /metrics."""
    servers = []

    def start(port: int = 0, **config) -> NullServer:
        server = NullServer(NullServerConfig(**config), port=port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
