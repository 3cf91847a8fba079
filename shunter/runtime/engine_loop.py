"""An instance's engine loop: a thread that steps an `InstanceEngine` on the wall clock.

Everything that changes the engine (add, abort, finish, and the calls of live
migration) arrives as a command in an inbox and is applied *between* steps, so
the scheduler is never touched mid-step and blocks freed by an abort are
released at a step boundary. What a step produced leaves through an outbox of
sequenced `StepMessage`s: one message per step with all of that step's
`TokenDelta`s, and the instance's `LoadReport` every `report_interval` seconds.
A frontend takes them with `poll(after_seq)`, which also acknowledges what it
has; a lost reply is simply polled again, so no delta is lost or duplicated.

The calls of live migration other than suspending a request
(`CONCURRENT_CALLS`) need not wait for a step to end: they run at once, under
the loop's lock, which the loop thread lets go of only while the executor
runs a batch or while it idles. None of them touches what the running batch
uses (they read counters, or change suspended requests, reservations and
imports, whose blocks are in no running batch), and none frees a block a
running batch holds, so a migration's final stage waits for no step.

Torch-free: the executor does the model work; this module only drives it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from shunter.engine import InstanceEngine, LoadReport
from shunter.engine.scheduler import MigrationCandidate, RequestState
from shunter.request import Request, TokenDelta

log = logging.getLogger(__name__)

T = TypeVar("T")
# finish_reason of a request the instance could not run (the message says why).
ERROR_FINISH = "error"
# Engine calls that may run while a batch executes (see the module docstring).
CONCURRENT_CALLS = frozenset({
    "begin_migration", "migration_progress", "end_migration", "release_migrated", "migration_refusal",
    "reserve_migration", "reserved_block_ids", "cancel_migration", "import_request", "migration_candidates",
})

# Concurrent calls after which a request may be ready to run here (an import, a migration given back).
WAKING_CALLS = frozenset({"import_request", "end_migration"})


@dataclass(slots=True)
class StepMessage:
    """What an instance pushes to the frontend: one step's deltas, and its load now and then.

    errors: request id -> why it ended with finish reason "error" (e.g. the
        instance refused it, or a step failed).
    candidates: with each report, the requests that could migrate away now
        (so the global scheduler's migration policies never ask for them).
    """

    seq: int
    deltas: list[TokenDelta] = field(default_factory=list)
    report: LoadReport | None = None
    errors: dict[str, str] = field(default_factory=dict)
    candidates: list[MigrationCandidate] | None = None


class EngineLoop:
    """Runs `engine` in a daemon thread with a command inbox and a sequenced outbox.

    report_interval: seconds between load reports (pushed with the next message).
    clock: the wall clock (`time.monotonic`); injectable for tests.
    on_push: called (in the loop thread) after each new message, so an
        in-process poller can wake without a thread of its own waiting in `poll`.
    """

    def __init__(self, engine: InstanceEngine, report_interval: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, on_push: Callable[[], None] | None = None,
                 record_steps: bool = False) -> None:
        if report_interval <= 0:
            raise ValueError(f"report_interval must be positive, got {report_interval!r}")
        self.engine = engine
        self.report_interval = report_interval
        self.clock = clock
        self._inbox: queue.SimpleQueue[tuple[Callable[[InstanceEngine, float], Any], Future]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._outbox: list[StepMessage] = []
        self._seq = 0
        self._handed_out = 0  # highest seq a poll has returned
        self._next_report = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{engine.instance_id}", daemon=True)
        # Held by the loop thread except while a batch executes or the loop idles (CONCURRENT_CALLS).
        self._lock = threading.Lock()
        self.num_steps = 0
        self.last_error: str | None = None
        self.on_push = on_push
        # With `record_steps`: every step's batch summary and wall time (`shunter.sim.profiled.ProfileStep`),
        # so a benchmark can check a latency model against the steps of a serving run.
        self.step_log: list | None = [] if record_steps else None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current step; pending commands are cancelled."""
        self._stop.set()
        self._inbox.put((lambda engine, now: None, Future()))  # wake an idle loop
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- commands (any thread) ---------------------------------------------------------
    def call(self, fn: Callable[[InstanceEngine, float], T]) -> Future[T]:
        """Apply `fn(engine, now)` in the loop thread between two steps; its result or exception in the future."""
        future: Future[T] = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError(f"instance {self.engine.instance_id} is stopped"))
            return future
        self._inbox.put((fn, future))
        return future

    def add_request(self, request: Request) -> Future[None]:
        """Queue a request. If the engine refuses it, its stream ends with finish reason "error" and the reason."""
        return self.call(lambda engine, now: self._add(engine, request, now))

    def resume_request(self, state: RequestState) -> Future[None]:
        """Take over a request whose instance died: it re-prefills its prompt and the tokens already
        streamed, then goes on from there. If the engine refuses it, its stream ends with an error."""
        return self.call(lambda engine, now: self._resume(engine, state, now))

    def abort_request(self, request_id: str) -> Future[TokenDelta | None]:
        """Abort in any state; the closing delta also goes out through the outbox."""
        return self.call(lambda engine, now: self._abort(engine, request_id, now))

    def finish_request(self, request_id: str) -> Future[bool]:
        """End a request as stopped (the frontend matched a stop string); frees its blocks."""
        return self.call(lambda engine, now: engine.finish_request(request_id, now))

    def load_report(self) -> Future[LoadReport]:
        return self.call(lambda engine, now: engine.load_report(now))

    def engine_call(self, name: str, *args) -> Future:
        """Call `engine.<name>(*args)` (the calls of live migration): at once if it is one of
        `CONCURRENT_CALLS`, else between two steps."""
        if name not in CONCURRENT_CALLS:
            return self.call(lambda engine, now: getattr(engine, name)(*args))
        future: Future = Future()
        with self._lock:
            try:
                future.set_result(getattr(self.engine, name)(*args))
            except BaseException as exc:
                future.set_exception(exc)
        if name in WAKING_CALLS:
            # It may have given an idle loop work (a request to run): wake it now rather than at its next
            # report (up to a report interval of a migrated request's downtime).
            self._inbox.put((lambda engine, now: None, Future()))
        return future

    # ---- outbox (the frontend's side) -----------------------------------------------------
    def poll(self, after_seq: int, timeout: float) -> list[StepMessage]:
        """Messages after `after_seq` (dropping those up to it: acknowledged), waiting up to `timeout` for one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._outbox and self._outbox[0].seq <= after_seq:
                self._outbox = [m for m in self._outbox if m.seq > after_seq]
            while not self._outbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return []
                self._cond.wait(remaining)
            self._handed_out = max(self._handed_out, self._outbox[-1].seq)
            return list(self._outbox)

    # ---- the loop thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        self._lock.acquire()
        try:
            stepped = False
            while not self._stop.is_set():
                # Nothing ran last time (idle, or every request here suspended or stuck waiting): sleep
                # until a command arrives or the next report is due, instead of spinning.
                self._apply_commands(wait=0.0 if stepped else max(self._next_report - self.clock(), 0.001))
                if self._stop.is_set():
                    break
                stepped = engine.has_unfinished_requests and self._step()
                self._maybe_report()
        finally:
            self._lock.release()
        self._cancel_pending()

    def _apply_commands(self, wait: float) -> None:
        try:
            if wait > 0:
                self._lock.release()  # idle: concurrent calls may run meanwhile
                try:
                    item = self._inbox.get(timeout=wait)
                finally:
                    self._lock.acquire()
            else:
                item = self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine, self.clock()))
                except BaseException as exc:  # the caller gets it; the loop lives on
                    future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> bool:
        """One step; False if there was nothing to run."""
        engine = self.engine
        started = self.clock()
        try:
            batch = engine.schedule(started)
            if batch.is_empty:
                return False
            self._lock.release()  # the batch runs; concurrent calls may run meanwhile
            try:
                result = engine.execute(batch)
            finally:
                self._lock.acquire()
            deltas = engine.end_step(batch, result, self.clock())
        except Exception as exc:  # a failed step must not kill the instance or hang its streams
            self._fail_all(exc)
            return True
        self.num_steps += 1
        if self.step_log is not None:
            from shunter.sim.profiled import ProfileStep

            ended = self.clock()
            self.step_log.append(ProfileStep.from_batch(batch, ended - started, ended))
        if deltas:
            self._push(deltas=deltas)
        return True

    def _fail_all(self, exc: Exception) -> None:
        """End every request here with an error (blocks freed) after a step raised."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("instance %s: step failed, ending its requests\n%s", self.engine.instance_id, traceback.format_exc())
        now = self.clock()
        ids = list(self.engine.scheduler.requests)
        deltas = [d for rid in ids if (d := self.engine.abort_request(rid, now)) is not None]
        for d in deltas:
            d.finish_reason = ERROR_FINISH
        # The clients get the exception's type only: its message may name files or devices (the log has it).
        reason = f"the instance failed a step ({type(exc).__name__}); the server log has the details"
        self._push(deltas=deltas, errors={rid: reason for rid in ids})

    def _maybe_report(self) -> None:
        now = self.clock()
        if now >= self._next_report:
            self._next_report = now + self.report_interval
            self._push(report=self.engine.load_report(now), candidates=self.engine.migration_candidates())

    def _push(self, deltas: list[TokenDelta] | None = None, report: LoadReport | None = None,
              errors: dict[str, str] | None = None, candidates: list[MigrationCandidate] | None = None) -> None:
        with self._cond:
            last = self._outbox[-1] if self._outbox else None
            if report is not None and not deltas and not errors and last is not None and last.seq > self._handed_out:
                last.report = report  # not yet handed out: the newer report replaces the older
                last.candidates = candidates
            else:
                self._seq += 1
                self._outbox.append(StepMessage(self._seq, deltas or [], report, errors or {}, candidates))
            self._cond.notify_all()
        if self.on_push is not None:
            self.on_push()

    # ---- commands' bodies (loop thread) ------------------------------------------------------
    def _add(self, engine: InstanceEngine, request: Request, now: float) -> None:
        try:
            engine.add_request(request)
        except ValueError as exc:
            delta = TokenDelta(request.request_id, [], now, ERROR_FINISH, 0)
            self._push(deltas=[delta], errors={request.request_id: str(exc)})
            raise

    def _resume(self, engine: InstanceEngine, state: RequestState, now: float) -> None:
        try:
            engine.import_request(state)
        except ValueError as exc:
            delta = TokenDelta(state.request_id, [], now, ERROR_FINISH, len(state.output_token_ids))
            self._push(deltas=[delta], errors={state.request_id: str(exc)})
            raise

    def _abort(self, engine: InstanceEngine, request_id: str, now: float) -> TokenDelta | None:
        delta = engine.abort_request(request_id, now)
        if delta is not None:
            self._push(deltas=[delta])
        return delta

    def _cancel_pending(self) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(f"instance {self.engine.instance_id} stopped"))
        with self._cond:
            self._cond.notify_all()
