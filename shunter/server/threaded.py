"""Serving an ASGI app with uvicorn, in the foreground or in a daemon thread; torch-free (the gateway uses it too)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time

import uvicorn


class ThreadedServer:
    """An ASGI app served by uvicorn in the foreground (`serve`) or in a daemon thread (tests, benchmarks).

    Subclasses implement `serve`: start what the app needs, run `_run_uvicorn`, and stop it again.
    `settings` needs `host`, `port`, `log_level`, `shutdown_timeout` and `timeouts` (`ConnectionTimeouts`).
    """

    def __init__(self, settings) -> None:
        self.settings = settings
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def _make_uvicorn(self, app) -> uvicorn.Server:
        """uvicorn for `app` on the settings' address, with their slow- and idle-client time-outs."""
        timeouts = self.settings.timeouts
        config = uvicorn.Config(app, host=self.settings.host, port=self.settings.port,
                                log_level=self.settings.log_level, lifespan="off",
                                timeout_graceful_shutdown=self.settings.shutdown_timeout,
                                http=timeouts.protocol(), timeout_keep_alive=timeouts.keep_alive)
        self._uvicorn = _Uvicorn(config)
        return self._uvicorn

    async def _run_uvicorn(self, on_ready=None) -> None:
        """Serve HTTP until told to stop; `on_ready(self)` once it listens."""
        serve_task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started and not serve_task.done():
            await asyncio.sleep(0.01)
        if self._uvicorn.started:
            self.started.set()
            if on_ready is not None:
                on_ready(self)
        await serve_task

    async def serve(self, on_ready=None) -> None:
        raise NotImplementedError

    def start_in_thread(self, timeout: float = 120.0):
        """Run `serve` in a daemon thread; returns self once HTTP is up (raises what stopped it otherwise)."""
        if self.settings.port == 0:
            self.settings.port = free_port(self.settings.host)

        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:  # reported to the starter
                self.error = exc
            finally:
                self.started.set()  # never leave the starter waiting (after `error` is set)

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
