"""The gateway and its HTTP app on one asyncio loop, in the foreground (`shunter serve --backend`) or a thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from shunter.cluster.bundles import PolicyConfig
from shunter.gateway.app import GatewayState, build_app
from shunter.gateway.backends import BackendSpec
from shunter.gateway.gateway import Gateway
from shunter.server.security import AccessPolicy
from shunter.server.threaded import ThreadedServer
from shunter.server.timeouts import ConnectionTimeouts


@dataclass
class GatewaySettings:
    """How to run one gateway (the `shunter serve` flags that apply to remote backends).

    backend_timeout: seconds a backend may send nothing (before its first byte
        or between chunks) before the request gets 504 or its stream an error event.
    allow_missing: start without backends that do not answer (warned), as long as one does.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    seed: int = 0
    control_interval: float = 0.05
    backend_timeout: float = 600.0
    allow_missing: bool = False
    access: AccessPolicy = field(default_factory=AccessPolicy)
    max_live_requests: int = 1024
    shutdown_timeout: float = 30.0
    timeouts: ConnectionTimeouts = field(default_factory=ConnectionTimeouts)  # slow and idle clients


class GatewayServer(ThreadedServer):
    """A `Gateway` over `backends` behind the gateway's HTTP app."""

    def __init__(self, settings: GatewaySettings, backends: list[BackendSpec], policy: PolicyConfig) -> None:
        super().__init__(settings)
        self.gateway = Gateway(backends, policy, seed=settings.seed, control_interval=settings.control_interval,
                               backend_timeout=settings.backend_timeout, allow_missing=settings.allow_missing)
        self.state = GatewayState(self.gateway, settings.access, settings.max_live_requests,
                                  timeouts=settings.timeouts)
        self.app = build_app(self.state)

    async def serve(self, on_ready=None) -> None:
        """Probe the backends (BackendProbeError if one does not answer), serve until told to stop."""
        uv = self._make_uvicorn(self.app)
        self.state.closing = lambda: uv.should_exit
        try:
            await self.gateway.start()
            await self._run_uvicorn(on_ready)
        finally:
            await self.gateway.shutdown()
