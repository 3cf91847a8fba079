"""What the global scheduler can ask of an instance, and the in-process implementation.

The `Instance` protocol is the seam between cluster code and engines: the
in-process instance (tests, the simulator) calls an `InstanceEngine` directly;
Ray-actor and remote-HTTP instances implement the same calls over a channel.
Everything here is synchronous and clock-free: `now` is passed in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from shunter.cluster.migration import MigrationEndpoint
from shunter.engine import InstanceEngine, LoadReport, RequestState
from shunter.engine.scheduler import MigrationCandidate, MigrationSnapshot
from shunter.request import Request, TokenDelta


@runtime_checkable
class Instance(MigrationEndpoint, Protocol):
    """One serving instance as the cluster sees it: requests, load, and the calls of live migration."""

    instance_id: str

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (nothing allocated) if it can never run here."""

    def abort_request(self, request_id: str, now: float) -> TokenDelta | None:
        """Abort a request in any state; its closing delta, or None if unknown here."""

    def load_report(self, now: float) -> LoadReport:
        """Queues and KV occupancy as of `now`."""

    def migration_candidates(self) -> list[MigrationCandidate]:
        """Requests that could start migrating away now (running decodes, waiting requests)."""

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

    # ---- live migration: straight to the engine ----------------------------------------
    def migration_candidates(self) -> list[MigrationCandidate]:
        return self.engine.migration_candidates()

    def begin_migration(self, request_id: str) -> MigrationSnapshot | None:
        return self.engine.begin_migration(request_id)

    def migration_progress(self, request_id: str) -> MigrationSnapshot | None:
        return self.engine.migration_progress(request_id)

    def suspend_migrating(self, request_id: str) -> RequestState | None:
        return self.engine.suspend_migrating(request_id)

    def end_migration(self, request_id: str) -> None:
        self.engine.end_migration(request_id)

    def release_migrated(self, request_id: str, now: float) -> bool:
        return self.engine.release_migrated(request_id, now)

    def export_waiting(self, request_id: str, now: float) -> RequestState | None:
        return self.engine.export_waiting(request_id, now)

    def migration_refusal(self, request_id: str, num_tokens: int, max_num_tokens: int,
                          needs_seat: bool = True) -> str | None:
        return self.engine.migration_refusal(request_id, num_tokens, max_num_tokens, needs_seat)

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> list[int] | None:
        return self.engine.reserve_migration(migration_id, request_id, num_tokens)

    def reserved_block_ids(self, migration_id: str) -> list[int]:
        return self.engine.reserved_block_ids(migration_id)

    def cancel_migration(self, migration_id: str) -> int:
        return self.engine.cancel_migration(migration_id)

    def import_request(self, state: RequestState, migration_id: str | None = None) -> Request:
        return self.engine.import_request(state, migration_id)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests

    def check_invariants(self) -> None:
        self.engine.check_invariants()

    def __repr__(self) -> str:
        return f"InProcessInstance({self.instance_id!r})"
