"""A remote OpenAI server (vLLM, SGLang, ...) as an instance of the gateway: the `InstanceHandle` seam.

The global scheduler dispatches to a `RemoteBackend` exactly as to a local
instance: it reads the backend's last `LoadReport` (from its scraped
metrics) plus what it dispatched there since. The request itself is not sent
by `add_request` but proxied over HTTP by the gateway, which registers it
here as a `Call` for as long as it is in flight, so that a failed backend can
cut its calls short (the non-streamed ones are retried elsewhere) and a
drained one can be stopped once it has none. Live migration is not available:
a remote server exposes no KV blocks, so `migration_candidates` is empty and
the engine calls refuse.
"""

from __future__ import annotations

import asyncio

from shunter.gateway.backends import BackendSpec
from shunter.gateway.scrape import Scraped
from shunter.request import Request
from shunter.runtime.handles import InstanceHandle, InstanceState

NO_MIGRATION = "live migration is not available for remote backends"


class Call:
    """One proxied request in flight on a backend: what can cut it short if the backend fails."""

    __slots__ = ("request", "sent_at", "task", "response", "failure", "first_at")

    def __init__(self, request: Request, sent_at: float) -> None:
        self.request = request
        self.sent_at = sent_at
        self.task: asyncio.Future | None = None  # waiting for the backend's answer (or headers, streamed)
        self.response = None  # aiohttp.ClientResponse whose body is being read
        self.failure: str | None = None  # why the backend was given up, once it was
        self.first_at: float | None = None  # when its first chunk came back (its prompt is prefilled)

    def cut(self, reason: str) -> None:
        """The backend failed: stop waiting for it (the proxy sees `failure` and retries or ends the stream)."""
        self.failure = reason
        if self.response is not None:
            self.response.close()  # a pending body read raises ClientConnectionError
        elif self.task is not None and not self.task.done():
            self.task.cancel()


class RemoteBackend(InstanceHandle):
    """A backend behind the gateway: URL, the models it serves, state, last report, calls in flight."""

    kind = "remote"

    def __init__(self, instance_id: str, spec: BackendSpec, models: tuple[str, ...], has_metrics: bool) -> None:
        super().__init__(instance_id, spec=None, role="mixed")
        self.backend = spec
        self.url = spec.url
        self.models = models
        self.has_metrics = has_metrics
        self.calls: dict[str, Call] = {}
        self.scraped: Scraped | None = None
        self.num_failed_checks = 0
        self.facts = {"url": spec.url, "models": list(models), "gpu": spec.gpu,
                      "metrics": "scraped" if has_metrics else "none: load is the gateway's own count",
                      "migration": NO_MIGRATION}

    # ---- the dispatch calls -----------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Nothing to check here: the backend judges the request, and its 4xx goes back to the client as is."""

    def _send_add(self, request: Request) -> None:
        pass  # the gateway's proxy sends it (and registers it with `track`)

    def _send_abort(self, request_id: str) -> None:
        pass  # closing the proxied connection is the abort: vLLM and SGLang stop a request whose client left

    def _send_finish(self, request_id: str) -> None:
        pass

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.calls)

    def in_flight_prompt_tokens(self) -> list[int]:
        return [c.request.num_prompt_tokens for c in self.calls.values()]

    def unprefilled_prompt_tokens(self, sent_before: float) -> list[int]:
        """Prompt tokens of the calls sent before `sent_before` that have had no chunk back yet."""
        return [c.request.num_prompt_tokens for c in self.calls.values()
                if c.first_at is None and c.sent_at < sent_before]

    # ---- calls ---------------------------------------------------------------------------
    def track(self, call: Call) -> None:
        self.calls[call.request.request_id] = call

    def untrack(self, call: Call) -> None:
        self.calls.pop(call.request.request_id, None)

    def cut_calls(self, reason: str) -> None:
        for call in list(self.calls.values()):
            call.cut(reason)

    @property
    def is_dispatchable(self) -> bool:
        return self.state is InstanceState.READY

    # ---- no live migration -----------------------------------------------------------------
    def engine_call(self, name: str, *args, timeout: float = 30.0):
        raise NotImplementedError(NO_MIGRATION)

    def copy_blocks(self, dst, src_block_ids, dst_block_ids, timeout: float = 60.0, background: bool = False) -> None:
        raise NotImplementedError(NO_MIGRATION)

    async def start(self) -> None:
        raise NotImplementedError("a remote backend is started by its own operator; the gateway probes it")

    async def poll(self, after_seq: int, timeout: float):
        raise NotImplementedError("a remote backend pushes nothing; the gateway scrapes its metrics")

    async def shutdown(self) -> None:
        self.state = InstanceState.STOPPED  # the gateway stops using it; the server itself keeps running

    def describe(self) -> dict:
        out = super().describe()
        out["in_flight"] = len(self.calls)
        return out
