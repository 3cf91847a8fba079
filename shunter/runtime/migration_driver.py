"""Live migration between real instances: the cluster's state machine driven with the wall clock.

`MigrationDriver` runs `shunter.cluster.migration.MigrationCoordinator` (the
very object the simulator drives with virtual time) in a thread of the
frontend process: each coordinator call on an instance becomes a blocking
engine call on it (`HandleEndpoint`), applied between two of its steps; each stage's copy goes from the source instance
straight to the destination (`InstanceHandle.copy_blocks`). Stage k copies the
full blocks filled since stage k-1 while the request keeps decoding on the
source; the final stage suspends it there, copies the rest and commits on the
destination. The frontend learns of every commit (`on_commit`) and moves the
request's entry in its owner map.

Several migrations run at once, one per worker thread (P/D hands every
request off after its first token, so one at a time would fall behind). The
coordinator is plain single-threaded code: a worker holds the driver's lock
whenever it is inside the coordinator, and lets go of it only while it waits
for an instance (`HandleEndpoint`) or copies blocks, so the coordinator's
state is only ever touched by one thread at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

from shunter.cluster.migration import Migration, MigrationCoordinator, MigrationRefused
from shunter.engine.scheduler import MigrationSnapshot, RequestState
from shunter.runtime.handles import CopyTimedOut, InstanceHandle

log = logging.getLogger(__name__)


class HandleEndpoint:
    """An instance handle as the coordinator's `MigrationEndpoint`: every call a blocking engine call."""

    def __init__(self, handle: InstanceHandle, lock: threading.Lock | None = None, timeout: float = 30.0) -> None:
        self.handle = handle
        self.instance_id = handle.instance_id
        self.lock = lock  # the driver's, held by the calling thread: released while the instance answers
        self.timeout = timeout  # seconds a call may take before the migration gives up on it
        # Set after a copy into this instance timed out: blocks until that copy has stopped writing.
        self.copy_in_flight: Callable[[], object] | None = None

    def _call(self, name: str, *args):
        if self.lock is None:
            return self.handle.engine_call(name, *args, timeout=self.timeout)
        self.lock.release()
        try:
            return self.handle.engine_call(name, *args, timeout=self.timeout)
        finally:
            self.lock.acquire()

    def begin_migration(self, request_id: str) -> MigrationSnapshot | None:
        return self._call("begin_migration", request_id)

    def migration_progress(self, request_id: str) -> MigrationSnapshot | None:
        return self._call("migration_progress", request_id)

    def suspend_migrating(self, request_id: str) -> RequestState | None:
        return self._call("suspend_migrating", request_id)

    def end_migration(self, request_id: str) -> None:
        self._call("end_migration", request_id)

    def release_migrated(self, request_id: str, now: float) -> bool:
        return self._call("release_migrated", request_id, now)

    def export_waiting(self, request_id: str, now: float) -> RequestState | None:
        return self._call("export_waiting", request_id, now)

    def migration_refusal(self, request_id: str, num_tokens: int, max_num_tokens: int,
                          needs_seat: bool = True) -> str | None:
        return self._call("migration_refusal", request_id, num_tokens, max_num_tokens, needs_seat)

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> list[int] | None:
        return self._call("reserve_migration", migration_id, request_id, num_tokens)

    def reserved_block_ids(self, migration_id: str) -> list[int]:
        return self._call("reserved_block_ids", migration_id)

    def cancel_migration(self, migration_id: str) -> int:
        wait = self.copy_in_flight
        if wait is None:
            return self._call("cancel_migration", migration_id)
        # A timed-out copy may still write into the reserved blocks: free them only once it has
        # stopped, or another request could get blocks that are then overwritten.
        def cancel_later() -> None:
            try:
                wait()
                self.handle.engine_call("cancel_migration", migration_id, timeout=self.timeout)
            except Exception:
                log.exception("freeing migration %s's reservation on instance %s failed", migration_id,
                              self.instance_id)
        threading.Thread(target=cancel_later, name=f"cancel-{migration_id}", daemon=True).start()
        return 0

    def import_request(self, state: RequestState, migration_id: str | None = None):
        self._call("import_request", state, migration_id)


class MigrationDriver:
    """Carries out migration orders in its own thread; each order's `Migration` comes back in a future.

    on_commit / on_end: called (in the driver's thread) when a migration
    commits / ends either way.
    """

    def __init__(self, coordinator: MigrationCoordinator, clock: Callable[[], float] = time.monotonic,
                 on_commit: Callable[[Migration], None] | None = None,
                 on_end: Callable[[Migration], None] | None = None, num_workers: int = 4,
                 stage_timeout: float = 10.0) -> None:
        self.coordinator = coordinator
        # A stage's copy, or any call on an instance, that takes longer aborts the migration: the
        # request goes on at the source (or, if the source died, resumes elsewhere).
        self.stage_timeout = stage_timeout
        self.clock = clock
        self.on_commit = on_commit
        self.on_end = on_end
        self._orders: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued: set[str] = set()  # request ids ordered but not started yet
        self._stop = threading.Event()
        self.history: list[Migration] = []
        self._threads = [threading.Thread(target=self._run, name=f"migration-driver-{i}", daemon=True)
                         for i in range(num_workers)]
        for t in self._threads:
            t.start()

    def is_busy(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._queued or request_id in self.coordinator.request_to_migration

    def submit(self, request_id: str, src: InstanceHandle, dst: InstanceHandle) -> Future[Migration]:
        """Queue an order; MigrationRefused (nothing queued) if it cannot start."""
        with self._lock:
            reason = self._refusal(request_id, src.instance_id, dst.instance_id)
            if reason is not None:
                raise MigrationRefused(reason)
            self._queued.add(request_id)
        future: Future[Migration] = Future()
        self._orders.put((request_id, src, dst, future))
        return future

    def _refusal(self, request_id: str, src_id: str, dst_id: str) -> str | None:
        if request_id in self._queued:
            return f"request {request_id!r} is already migrating (queued)"
        return self.coordinator.refusal(request_id, src_id, dst_id)

    def num_active(self, instance_id: str) -> int:
        """Migrations in flight with this instance as source or destination (for the pairing policy)."""
        return self.coordinator.num_active(instance_id)

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._orders.put(None)
        for t in self._threads:
            t.join(10)

    # ---- the driver's thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._orders.get()
            if item is None:
                break
            request_id, src, dst, future = item
            try:
                m = self._migrate(request_id, src, dst)
            except BaseException as exc:  # reported to whoever ordered it; the driver carries on
                log.exception("migration of %s from %s to %s failed", request_id, src.instance_id, dst.instance_id)
                future.set_exception(exc)
            else:
                future.set_result(m)

    def _migrate(self, request_id: str, src: InstanceHandle, dst: InstanceHandle) -> Migration:
        m: Migration | None = None
        try:
            with self._lock:
                self._queued.discard(request_id)
                m = self.coordinator.start(request_id, HandleEndpoint(src, self._lock, self.stage_timeout),
                                           HandleEndpoint(dst, self._lock, self.stage_timeout), self.clock())
                self.history.append(m)
                self._run_stages(m, src, dst)
        finally:
            # Outside the lock: the callbacks only schedule work on the frontend's event loop.
            if m is not None and m.outcome == "committed" and self.on_commit is not None:
                self.on_commit(m)
            if m is not None and self.on_end is not None:
                self.on_end(m)
        return m

    def _run_stages(self, m: Migration, src: InstanceHandle, dst: InstanceHandle) -> None:
        """Stage after stage until commit or abort (the caller holds the lock)."""
        coordinator = self.coordinator
        try:
            while m.is_active:
                plan = coordinator.advance(m, self.clock())
                if plan is None:
                    break  # aborted, or a waiting request moved in one step
                if plan.is_final:
                    # The request stops decoding when the source applies the suspension, at the end of the
                    # step under way when it was asked (a step in which it still decoded): stamp the
                    # final stage when the source has answered, not when it was asked.
                    m.final_stage_time = self.clock()
                if plan.num_blocks:
                    self._lock.release()  # the copy is between the two instances; others may go on
                    try:
                        src.copy_blocks(dst, plan.src_block_ids, plan.dst_block_ids, timeout=self.stage_timeout,
                                        background=not plan.is_final)
                    finally:
                        self._lock.acquire()
                if plan.is_final:
                    coordinator.commit(m, self.clock())
                    if m.outcome == "committed":
                        m.end_time = self.clock()  # the destination has imported it: it decodes there now
        except Exception as exc:  # an instance died or a stage timed out: give the request back to the source
            if isinstance(exc, CopyTimedOut):
                m.dst.copy_in_flight = exc.wait
            if not m.is_active:  # committed: the destination owns it; only telling the source failed
                log.warning("migration %s committed, but instance %s was not told: %s", m.migration_id, m.src_id, exc)
                return
            log.warning("migration %s of %s from %s to %s aborted: %s: %s", m.migration_id, m.request_id,
                        m.src_id, m.dst_id, type(exc).__name__, exc)
            try:
                coordinator.abort(m, self.clock(), f"{type(exc).__name__}: {exc}")
            except Exception:  # one side is unreachable; the other has freed its part (see `abort`)
                log.warning("aborting migration %s: an instance did not answer", m.migration_id, exc_info=True)
            # The outcome ("aborted", and why) is the migration's: whoever ordered it reads it there.
