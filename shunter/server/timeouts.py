"""Slow and idle clients are cut off: a connection costs a socket and a parser, and a client that never
finishes its request must not hold them (nor a handler waiting on its body) forever.

Three limits, each a `shunter serve` flag:

- keep-alive: a connection with no request under way (just opened, or between requests) is closed
  after `keep_alive` seconds without a byte (uvicorn's `timeout_keep_alive`, which uvicorn arms only
  after a response: here it is also armed when the connection opens);
- request header: a request's headers must be complete within `request_header` seconds of the
  connection opening or of the previous response's end, else 408 and the connection is closed
  (slowloris: a header every few seconds resets no timer here);
- request body: once its headers are in, a request's body must be complete within `request_body`
  seconds, else 408 with an OpenAI-style body and the connection is closed.

uvicorn has none of the last two: its only timer is the keep-alive one, which any byte cancels and
which is not armed before the first request. The header deadline lives in a small subclass of
uvicorn's httptools protocol (the parser that `uvicorn[standard]` installs; uvicorn's Config takes a
protocol class for `http`), because only the protocol sees a connection before there is a request.
The body deadline is an ASGI middleware around `receive`, so the 408 goes through the app's error
handlers like every other error.
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shunter.server.errors import OpenAIError


@dataclass(frozen=True)
class ConnectionTimeouts:
    """Seconds a client gets: idle between requests, to send a request's headers, to send its body."""

    keep_alive: float = 5.0
    request_header: float = 10.0
    request_body: float = 30.0

    def protocol(self) -> Callable[..., HttpToolsProtocol]:
        """The `http` protocol factory for uvicorn's Config."""
        return functools.partial(DeadlineHttpProtocol, request_header_timeout=self.request_header)


def _timeout_error(what: str, seconds: float) -> OpenAIError:
    return OpenAIError(408, f"the request {what} did not arrive within {seconds:g} s", headers={"Connection": "close"})


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers and keep-alive from the start."""

    def __init__(self, *args, request_header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request_header_timeout = request_header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._bytes_since_armed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # An opened connection that sends nothing is idle like one between requests.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bytes_since_armed = True
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn armed its keep-alive timer only if it now waits for a new request (no pipelined one started).
        if self.timeout_keep_alive_task is not None:
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._bytes_since_armed = False
        self._header_deadline = self.loop.call_later(self.request_header_timeout, self._on_header_deadline)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _on_header_deadline(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self._bytes_since_armed:  # part of a request came: say why it is cut off
            error = _timeout_error("headers", self.request_header_timeout)
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


class BodyDeadline:
    """ASGI middleware: the request body must be read in full within `timeout` seconds of the headers,
    else the handler reading it gets a 408 (`OpenAIError`, answered by the app's handlers, and the
    connection closed). Once the body is in, `receive` is passed through untouched: it then waits for
    the client's disconnect, which must not time out."""

    def __init__(self, app, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _timeout_error("body", self.timeout) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
