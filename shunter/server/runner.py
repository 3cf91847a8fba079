"""Putting a server together and running it: in the foreground (`shunter serve`) or in a thread (tests, benchmarks).

`build_server` loads only what a frontend needs (tokenizer, context length);
the instances load the weights themselves, in their own processes when they
are Ray actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn

from shunter.cluster.bundles import PolicyConfig
from shunter.model.tokenizer import Tokenizer
from shunter.runtime.handles import InstanceHandle, LocalInstance
from shunter.runtime.spec import InstanceSpec
from shunter.server.app import ServerState, build_app
from shunter.server.frontend import Frontend, HandleFactory
from shunter.server.security import AccessPolicy
from shunter.server.timeouts import ConnectionTimeouts


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
    pd: tuple[int, int] | None = None  # prefill and decode instances (then num_instances is their sum)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    timeouts: ConnectionTimeouts = field(default_factory=ConnectionTimeouts)  # slow and idle clients
    max_live_requests: int = 1024
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    restart_failed: bool = False  # start a replacement for each instance that dies
    migration_stage_timeout: float = 10.0  # seconds a migration stage may take before it aborts


def local_handles(instance_id: str, spec: InstanceSpec) -> InstanceHandle:
    return LocalInstance(instance_id, spec)


def ray_handles(instance_id: str, spec: InstanceSpec) -> InstanceHandle:
    from shunter.runtime.ray_instance import RayInstance

    return RayInstance(instance_id, spec)


class Server:
    """A frontend, its instances and the HTTP app, on one asyncio loop."""

    def __init__(self, settings: ServerSettings, spec: InstanceSpec, policy: PolicyConfig, tokenizer: Tokenizer,
                 max_model_len: int, make_handle: HandleFactory = local_handles) -> None:
        self.settings = settings
        self.frontend = Frontend(make_handle, spec, policy, settings.served_model_names[0], tokenizer.eos_token_id,
                                 seed=settings.seed, control_interval=settings.control_interval, pd=settings.pd,
                                 restart_failed=settings.restart_failed,
                                 stage_timeout=settings.migration_stage_timeout)
        max_len = spec.max_model_len or max_model_len
        self.state = ServerState(self.frontend, tokenizer, list(settings.served_model_names), max_len,
                                 settings.access, settings.timeouts, settings.max_live_requests)
        self.app = build_app(self.state)
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    async def serve(self, on_ready=None) -> None:
        """Start the instances, serve HTTP until told to stop, then stop the instances."""
        config = uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port,
                                log_level=self.settings.log_level, lifespan="off",
                                timeout_graceful_shutdown=self.settings.shutdown_timeout,
                                http=self.settings.timeouts.protocol(),
                                timeout_keep_alive=self.settings.timeouts.keep_alive)
        self._uvicorn = _Uvicorn(config)
        # On SIGTERM/SIGINT uvicorn stops listening and waits for in-flight requests; requests that still
        # arrive on open connections meanwhile get 503 (`ServerState.closing`).
        self.state.closing = lambda: self._uvicorn.should_exit
        try:
            await self.frontend.start(self.settings.num_instances)
            # Sized by the instances' own limits: the model's context may be capped by each instance.
            lens = [h.config.max_model_len for h in self.frontend.handles.values() if h.config is not None]
            if lens:
                self.state.max_model_len = min([self.state.max_model_len, *lens])
            serve_task = asyncio.create_task(self._uvicorn.serve())
            while not self._uvicorn.started and not serve_task.done():
                await asyncio.sleep(0.01)
            if self._uvicorn.started:
                self.started.set()
                if on_ready is not None:
                    on_ready(self)
            deadline = asyncio.create_task(self._end_streams_at_the_deadline())
            await serve_task
            deadline.cancel()
        finally:
            await self.frontend.shutdown()
            self.started.set()  # never leave a waiter hanging

    async def _end_streams_at_the_deadline(self, margin: float = 0.5) -> None:
        """Once shutdown begins: requests still running shortly before the graceful deadline end with a
        clear error event (then `[DONE]`), instead of having their connections cut when uvicorn gives up."""
        while not self._uvicorn.should_exit:
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, self.settings.shutdown_timeout - margin))
        self.frontend.abort_all("the server shut down before the request finished "
                                f"(--shutdown-timeout {self.settings.shutdown_timeout:g} s)")

    # ---- in a thread (tests, benchmarks) ---------------------------------------------------
    def start_in_thread(self, timeout: float = 120.0) -> Server:
        """Run `serve` in a daemon thread; returns once HTTP is up (raises what stopped it otherwise)."""
        if self.settings.port == 0:
            self.settings.port = free_port(self.settings.host)

        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:  # reported to the starter
                self.error = exc
                self.started.set()

        self._thread = threading.Thread(target=run, name="shunter-server", daemon=True)
        self._thread.start()
        if not self.started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self.error is not None:
            raise self.error
        if self._uvicorn is None or not self._uvicorn.started:
            raise RuntimeError("the server stopped before it started")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM ends in a clean exit (status 0) once the requests in flight
    are done: uvicorn re-raises the signal after its graceful shutdown, which would kill the process
    before the instances are stopped and report the orderly shutdown as a death by signal."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            # uvicorn keeps the signals it caught in this list and re-raises them on leaving.
            self._captured_signals = [s for s in getattr(self, "_captured_signals", []) if s != signal.SIGTERM]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
