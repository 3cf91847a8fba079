"""Putting a server together and running it: in the foreground (`shunter serve`) or in a thread (tests, benchmarks).

`build_server` loads only what a frontend needs (tokenizer, context length);
the instances load the weights themselves, in their own processes when they
are Ray actors.

With `ServerSettings.backends` the server is mixed: a `Gateway` over those
remote OpenAI servers runs on the same event loop beside the frontend, with
one metrics registry, and every backend serving the own instances' model
joins the frontend's dispatching scheduler.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.disaggregation import PDSplit
from shunter.gateway.backends import BackendSpec
from shunter.gateway.gateway import Gateway
from shunter.gateway.metrics import GatewayMetrics
from shunter.model.tokenizer import Tokenizer
from shunter.runtime.handles import InstanceHandle, LocalInstance
from shunter.runtime.spec import InstanceSpec
from shunter.server.app import ServerState, build_app
from shunter.server.frontend import Frontend, HandleFactory
from shunter.server.security import AccessPolicy
from shunter.server.timeouts import ConnectionTimeouts
from shunter.server.threaded import ThreadedServer, free_port, wait_until  # noqa: F401 (re-exported)


@dataclass
class ServerSettings:
    """How to run one server (the `shunter serve` flags that are not the instance spec or the policy)."""

    host: str = "127.0.0.1"
    port: int = 8000
    num_instances: int = 2
    served_model_names: tuple[str, ...] = ("default",)
    log_level: str = "warning"
    seed: int = 0
    control_interval: float = 0.05
    pd: PDSplit | tuple[int, int] | None = None  # prefill and decode instances (then num_instances is their sum)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    timeouts: ConnectionTimeouts = field(default_factory=ConnectionTimeouts)  # slow and idle clients
    max_live_requests: int = 1024
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    restart_failed: bool = False  # start a replacement for each instance that dies
    migration_stage_timeout: float = 10.0  # seconds a migration stage may take before it aborts
    instance_timeout: float = 60.0  # seconds an instance may send nothing before it counts as failed
    # Remote OpenAI servers beside the own instances (a mixed server; see `shunter.gateway.server` for the flags).
    backends: tuple[BackendSpec, ...] = ()
    backend_timeout: float = 600.0
    allow_missing_backends: bool = False


def local_handles(instance_id: str, spec: InstanceSpec) -> InstanceHandle:
    return LocalInstance(instance_id, spec)


def ray_handles(instance_id: str, spec: InstanceSpec) -> InstanceHandle:
    from shunter.runtime.ray_instance import RayInstance

    return RayInstance(instance_id, spec)


class Server(ThreadedServer):
    """A frontend, its instances and the HTTP app, on one asyncio loop."""

    def __init__(self, settings: ServerSettings, spec: InstanceSpec, policy: PolicyConfig, tokenizer: Tokenizer,
                 max_model_len: int, make_handle: HandleFactory = local_handles) -> None:
        super().__init__(settings)
        if settings.backends and (settings.pd or policy.scaling):
            raise ValueError("remote backends cannot go with P/D disaggregation or autoscaling (they can neither "
                             "take a migrated request nor be started or stopped by Shunter)")
        names = settings.served_model_names
        # A mixed server's metrics: serving mode's names per instance of either kind, plus the backends' own.
        metrics = GatewayMetrics(names[0]) if settings.backends else None
        self.frontend = Frontend(make_handle, spec, policy, names[0], tokenizer.eos_token_id,
                                 seed=settings.seed, control_interval=settings.control_interval, pd=settings.pd,
                                 restart_failed=settings.restart_failed,
                                 stage_timeout=settings.migration_stage_timeout,
                                 instance_timeout=settings.instance_timeout, metrics=metrics)
        self.gateway = Gateway(
            list(settings.backends), policy, seed=settings.seed, control_interval=settings.control_interval,
            backend_timeout=settings.backend_timeout, allow_missing=settings.allow_missing_backends,
            metrics=metrics, shared=self.frontend.scheduler, shared_models=names, id_prefix="b",
        ) if settings.backends else None
        max_len = spec.max_model_len or max_model_len
        self.state = ServerState(self.frontend, tokenizer, list(names), max_len, settings.access,
                                 settings.timeouts, settings.max_live_requests, gateway=self.gateway)
        self.app = build_app(self.state)

    async def serve(self, on_ready=None) -> None:
        """Start the instances, serve HTTP until told to stop, then stop the instances."""
        uv = self._make_uvicorn(self.app)
        # On SIGTERM/SIGINT uvicorn stops listening and waits for in-flight requests; requests that still
        # arrive on open connections meanwhile get 503 (`ServerState.closing`).
        self.state.closing = lambda: uv.should_exit
        try:
            await self.frontend.start(self.settings.num_instances)
            if self.gateway is not None:  # after the own instances: they come first in dispatch order
                await self.gateway.start()
            # Sized by the instances' own limits: the model's context may be capped by each instance.
            lens = [h.config.max_model_len for h in self.frontend.handles.values() if h.config is not None]
            if lens:
                self.state.max_model_len = min([self.state.max_model_len, *lens])
            deadline = asyncio.create_task(self._end_streams_at_the_deadline())
            try:
                await self._run_uvicorn(on_ready)
            finally:
                deadline.cancel()
        finally:
            if self.gateway is not None:
                await self.gateway.shutdown()
            await self.frontend.shutdown()

    async def _end_streams_at_the_deadline(self, margin: float = 0.5) -> None:
        """Once shutdown begins: requests still running shortly before the graceful deadline end with a
        clear error event (then `[DONE]`), instead of having their connections cut when uvicorn gives up."""
        while not self._uvicorn.should_exit:
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, self.settings.shutdown_timeout - margin))
        self.frontend.abort_all("the server shut down before the request finished "
                                f"(--shutdown-timeout {self.settings.shutdown_timeout:g} s)")
