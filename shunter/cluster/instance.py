"""What the global scheduler can ask of an instance, and the in-process implementation.

The `Instance` protocol is the seam between cluster policies and engines: the
in-process instance (tests, the simulator) calls an `InstanceEngine` directly;
Ray-actor and remote-HTTP instances implement the same calls over a channel.
Everything here is synchronous and clock-free: `now` is passed in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from shunter.cluster.load import LoadReport
from shunter.engine import InstanceEngine, RequestState
from shunter.request import Request, TokenDelta


@runtime_checkable
class Instance(Protocol):
    """One serving instance as the cluster sees it."""

    instance_id: str

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (nothing allocated) if it can never run here."""

    def abort_request(self, request_id: str, now: float) -> TokenDelta | None:
        """Abort a request in any state; its closing delta, or None if unknown here."""

    def load_report(self, now: float) -> LoadReport:
        """Queues and KV occupancy as of `now`."""

    # Live migration (Llumnix §4): the source exports and later releases, the
    # destination reserves blocks stage by stage and finally imports.
    def export_request(self, request_id: str) -> RequestState: ...

    def release_exported(self, request_id: str, now: float) -> None: ...

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int] | None: ...

    def cancel_reservation(self, request_id: str) -> None: ...

    def import_request(self, state: RequestState) -> Request: ...

    @property
    def has_unfinished_requests(self) -> bool: ...


class InProcessInstance:
    """An `Instance` that is an `InstanceEngine` in this process."""

    def __init__(self, engine: InstanceEngine) -> None:
        self.engine = engine
        self.instance_id = engine.instance_id

    def add_request(self, request: Request) -> None:
        self.engine.add_request(request)

    def abort_request(self, request_id: str, now: float) -> TokenDelta | None:
        return self.engine.abort_request(request_id, now)

    def load_report(self, now: float) -> LoadReport:
        return self.engine.load_report(now)

    def step(self, now: float) -> list[TokenDelta]:
        """One engine step starting at `now` (real serving drives this in its loop)."""
        return self.engine.step(now)

    def get_request(self, request_id: str) -> Request | None:
        return self.engine.get_request(request_id)

    def export_request(self, request_id: str) -> RequestState:
        return self.engine.export_request(request_id)

    def release_exported(self, request_id: str, now: float) -> None:
        self.engine.release_exported(request_id, now)

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int] | None:
        return self.engine.reserve_blocks(request_id, num_tokens)

    def cancel_reservation(self, request_id: str) -> None:
        self.engine.cancel_reservation(request_id)

    def import_request(self, state: RequestState) -> Request:
        return self.engine.import_request(state)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests

    def check_invariants(self) -> None:
        self.engine.check_invariants()

    def __repr__(self) -> str:
        return f"InProcessInstance({self.instance_id!r})"
