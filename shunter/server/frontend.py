"""The frontend's core: instances, the global scheduler, the owner map and the token pumps.

Per instance, one pump task polls its step messages (one message per engine
step, all of that step's deltas in it) and routes each delta to the request's
stream; the same messages carry the load reports the global scheduler
dispatches on, so load is never asked for per request. Each live request has
one entry in the owner map (`streams[request_id].instance_id`): aborts and
stop-string finishes go to the instance that owns it.

Everything here runs on the server's asyncio loop; the scheduling decisions
are the cluster code's (`GlobalScheduler`, the registered policies), the same
objects the simulator drives.

In a mixed server the dispatching scheduler also holds remote backends, which
the gateway (`shunter.gateway.gateway`) admits, watches and removes; the
frontend owns only its own instances (`handles`). The scheduler holds the
backends as fixed instances, so migrations and resumes stay among the own ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.disaggregation import MIXED, Disaggregation, PDSplit
from shunter.cluster.drain import stop_if_drained
from shunter.cluster.global_scheduler import GlobalScheduler, MigrationOrder
from shunter.cluster.migration import Migration, MigrationConfig, MigrationCoordinator, MigrationRefused
from shunter.engine.scheduler import RequestState
from shunter.request import Request, SamplingParams, TokenDelta
from shunter.runtime.handles import InstanceHandle, InstanceState, NoInstanceError  # noqa: F401 (re-exported)
from shunter.runtime.migration_driver import MigrationDriver
from shunter.runtime.spec import InstanceSpec
from shunter.server.metrics import ServerMetrics
from shunter.server.streams import RequestStream, StreamEvent

log = logging.getLogger(__name__)

HandleFactory = Callable[[str, InstanceSpec], InstanceHandle]
POLL_TIMEOUT = 1.0  # seconds a poll waits for a message; reports arrive far more often


class InstanceUnresponsive(RuntimeError):
    """An instance that has sent nothing (no step, no report) for longer than the health timeout."""


class UnknownInstanceError(KeyError):
    pass


class UnknownRequestError(KeyError):
    """No live request by that id (never was, or finished)."""


class Frontend:
    """Owns the instances and every live request's stream."""

    def __init__(self, make_handle: HandleFactory, spec: InstanceSpec, policy: PolicyConfig, model_name: str,
                 eos_token_id: int | None, seed: int = 0, control_interval: float = 0.05,
                 migration: MigrationConfig | None = None, pd: PDSplit | tuple[int, int] | None = None,
                 restart_failed: bool = False, stage_timeout: float = 10.0, instance_timeout: float = 60.0,
                 metrics: ServerMetrics | None = None) -> None:
        self.make_handle = make_handle
        self.spec = spec
        self.policy = policy
        self.model_name = model_name
        self.eos_token_id = eos_token_id
        # P/D disaggregation (the cluster's rule, `Disaggregation`): new requests go to prefill instances
        # (`scheduler` is then the prefill one); after its first token each is handed off to a decode instance.
        self.pd = Disaggregation(pd, policy, seed) if pd else None
        self.scheduler = self.pd.prefill if self.pd else GlobalScheduler(policy=policy, seed=seed)
        self.metrics = metrics or ServerMetrics(model_name)
        self.handles: dict[str, InstanceHandle] = {}
        self.streams: dict[str, RequestStream] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._instance_ids = itertools.count()
        self._request_ids = itertools.count()
        self.control_interval = control_interval
        self.restart_failed = restart_failed  # start a replacement for every instance that dies
        self.stage_timeout = stage_timeout  # a migration stage (copy or instance call) slower than this aborts
        self.instance_timeout = instance_timeout  # an instance silent this long (seconds) has failed
        self.coordinator = MigrationCoordinator(migration or MigrationConfig(), spec.block_size)
        self.migrations: MigrationDriver | None = None  # started with the event loop (`start`)
        self._migrating: set[str] = set()  # requests ordered to migrate whose outcome is not settled here yet
        self._closing = False
        self._control_task: asyncio.Task | None = None
        # Autoscaling (policy.scaling): instances ordered and not up yet; instances drained to be removed.
        self._num_starting = 0
        self._scaling_down: set[str] = set()
        self._next_scaling = 0.0
        self.scaling_actions: list[tuple[float, int, str | None]] = []

    # ---- instances -----------------------------------------------------------------------
    async def add_instance(self, role: str = MIXED) -> InstanceHandle:
        """Start one more instance; it takes work once it is up (its first report seeds dispatch)."""
        handle = await self._launch(role)
        self._register(handle)
        return handle

    async def _launch(self, role: str) -> InstanceHandle:
        instance_id = str(next(self._instance_ids))
        handle = self.make_handle(instance_id, self.spec)
        handle.role = role
        self.handles[instance_id] = handle
        self._update_state_gauge()
        try:
            await handle.start()
        except Exception as exc:
            handle.state = InstanceState.FAILED
            handle.error = f"{type(exc).__name__}: {exc}"
            self._update_state_gauge()
            raise
        return handle

    def _register(self, handle: InstanceHandle) -> None:
        """Admit a started instance to dispatch and start its pump."""
        self.scheduler_for(handle).add_instance(handle, handle.last_report)
        self.metrics.observe_report(handle.last_report)
        self._pumps[handle.instance_id] = asyncio.create_task(self._pump(handle), name=f"pump-{handle.instance_id}")
        self._update_state_gauge()

    def scheduler_for(self, handle: InstanceHandle) -> GlobalScheduler:
        """The scheduler dispatching to an own instance (P/D: decode instances have their own)."""
        return self.pd.scheduler_for(handle.role) if self.pd else self.scheduler

    async def start(self, num_instances: int) -> None:
        """Start the instances side by side (with --pd P:D, P prefill and D decode ones), the migration
        driver and the control loop."""
        loop = asyncio.get_running_loop()
        self.migrations = MigrationDriver(
            self.coordinator,
            on_commit=lambda m: loop.call_soon_threadsafe(self._migrated, m),
            on_end=lambda m: loop.call_soon_threadsafe(self._migration_ended, m), stage_timeout=self.stage_timeout)
        roles = self.pd.split.roles() if self.pd else [MIXED] * num_instances
        results = await asyncio.gather(*(self._launch(role) for role in roles), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        for handle in results:  # in id order, whichever started first: round robin begins at instance 0
            self._register(handle)
        self._control_task = asyncio.create_task(self._control_loop(), name="control")

    def get_handle(self, instance_id: str) -> InstanceHandle:
        try:
            return self.handles[instance_id]
        except KeyError:
            raise UnknownInstanceError(instance_id) from None

    def drain(self, instance_id: str) -> InstanceHandle:
        """Take no new work on the instance; the control loop's drain orders move its requests away."""
        handle = self.get_handle(instance_id)
        if handle.state is InstanceState.READY:
            self.scheduler_for(handle).drain(instance_id)
            handle.state = InstanceState.DRAINING
            self._update_state_gauge()
        return handle

    def _update_state_gauge(self) -> None:
        self.metrics.count_instances("shunter", (h.state for h in self.handles.values()))

    @property
    def ready_instances(self) -> list[InstanceHandle]:
        return [h for h in self.handles.values() if h.state is InstanceState.READY]

    async def shutdown(self) -> None:
        self._closing = True
        if self._control_task is not None:
            self._control_task.cancel()
        if self.migrations is not None:
            await asyncio.to_thread(self.migrations.stop)
        for task in self._pumps.values():
            task.cancel()
        for rid in list(self.streams):
            self._end(rid, "abort", "the server is shutting down")
        await asyncio.gather(*(h.shutdown() for h in self.handles.values()
                               if h.state not in (InstanceState.FAILED, InstanceState.STOPPED)),
                             return_exceptions=True)

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> RequestStream:
        """Dispatch a validated request to one of the own instances (a server without remote backends);
        ValueError (nothing sent) if it cannot run, NoInstanceError if nothing can take it."""
        request = self.new_request(prompt_token_ids, params, priority)
        self.dispatch(request)
        return self.streams[request.request_id]

    def new_request(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> Request:
        now = time.monotonic()
        return Request(request_id=f"cmpl-{next(self._request_ids)}-{int(now * 1000) % 100000}",
                       prompt_token_ids=prompt_token_ids, sampling_params=params, arrival_time=now,
                       priority=priority, eos_token_id=self.eos_token_id)

    def dispatch(self, request: Request) -> InstanceHandle:
        """The instance the dispatch policy picks for `request`, which is then on its way there: one of
        the own instances has it queued and its stream open (`streams[request.request_id]`); a remote
        backend (a mixed server's) has it counted in the view, and the caller proxies it.

        ValueError (nothing sent) if it cannot run on the instance picked; NoInstanceError if nothing can take it.
        """
        try:
            handle = self.scheduler.select_instance(request, time.monotonic())
        except ValueError as exc:
            raise NoInstanceError(str(exc)) from None
        # Validate before the owner map knows it: a refused request leaves nothing anywhere.
        handle.validate(request)
        if handle.instance_id in self.handles:  # one of ours: its tokens come back through our pumps
            self.streams[request.request_id] = RequestStream(
                request.request_id, handle.instance_id, request.num_prompt_tokens, request.arrival_time,
                request=request, handoff_pending=self.pd is not None)
        self.scheduler.assign(request, handle)
        self.metrics.dispatches.labels(self.policy.dispatch, handle.instance_id).inc()
        return handle

    async def events(self, stream: RequestStream) -> AsyncIterator[StreamEvent]:
        """The stream's events until it finishes (the last one carries the finish reason).

        Events that queued up while the client was being served are merged into
        one, so a busy server writes fewer, larger chunks instead of falling behind.
        """
        queue = stream.queue
        while True:
            event = await queue.get()
            while event.finish_reason is None and not queue.empty():
                more = queue.get_nowait()
                event = StreamEvent(event.token_ids + more.token_ids, more.time, more.finish_reason, more.error)
            yield event
            if event.finish_reason is not None:
                return

    def abort(self, request_id: str) -> None:
        """Abort wherever the request is (client gone); its blocks are freed on the owning instance."""
        stream = self.streams.get(request_id)
        if stream is None:
            return
        handle = self.handles.get(stream.instance_id)
        if handle is not None:
            handle.abort_request(request_id, time.monotonic())
        self._end(request_id, "abort")

    def abort_all(self, reason: str) -> None:
        """Abort every live request on its instance; each stream ends with an error event saying `reason`."""
        for request_id, stream in list(self.streams.items()):
            handle = self.handles.get(stream.instance_id)
            if handle is not None and handle.state is not InstanceState.FAILED:
                handle.abort_request(request_id, time.monotonic())
            self._end(request_id, "error", reason)

    def finish_stopped(self, request_id: str) -> None:
        """The client's stop string matched: end it on the owning instance as stopped."""
        stream = self.streams.get(request_id)
        if stream is None:
            return
        handle = self.handles.get(stream.instance_id)
        if handle is not None:
            handle.finish_request(request_id)
        self._end(request_id, "stop")

    def _end(self, request_id: str, reason: str, error: str | None = None) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        now = time.monotonic()
        stream.finish(reason, now, error)
        self.metrics.observe_finish(stream.instance_id, stream.num_prompt_tokens, now - stream.arrival_time, reason)

    # ---- the token path --------------------------------------------------------------------------
    async def _pump(self, handle: InstanceHandle) -> None:
        """Take the instance's step messages until it stops; if it dies or goes silent, it has failed."""
        seq = 0
        last_heard = time.monotonic()
        try:
            while handle.state in (InstanceState.READY, InstanceState.DRAINING):
                # Health check: an instance pushes a report every report interval, busy or idle, so one
                # silent for `instance_timeout` (its process hung, or its loop stuck in a step) has failed.
                try:
                    messages = await asyncio.wait_for(handle.poll(seq, POLL_TIMEOUT),
                                                      POLL_TIMEOUT + self.instance_timeout)
                except asyncio.TimeoutError:
                    messages = []
                now = time.monotonic()
                if messages:
                    last_heard = now
                elif now - last_heard > self.instance_timeout:
                    self._instance_failed(handle, InstanceUnresponsive(
                        f"instance {handle.instance_id} sent nothing for {now - last_heard:.1f} s "
                        f"(--instance-timeout {self.instance_timeout:g})"))
                    asyncio.create_task(handle.shutdown())  # a hung process must not run on unseen
                    return
                for message in messages:
                    seq = message.seq
                    if message.report is not None:
                        handle.last_report = message.report
                        if message.candidates is not None:
                            handle.candidates = message.candidates
                        self.scheduler_for(handle).update_reports([message.report])
                        self.metrics.observe_report(message.report)
                    for delta in message.deltas:
                        self._deliver(delta, message.errors.get(delta.request_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the actor died or its channel broke
            if not self._closing:  # (at shutdown the instances are being stopped: not a failure)
                self._instance_failed(handle, exc)

    def _deliver(self, delta: TokenDelta, error: str | None) -> None:
        stream = self.streams.get(delta.request_id)
        if stream is None:
            return  # aborted or stopped here already; the instance's late deltas are dropped
        now = time.monotonic()
        before = stream.next_index
        stream.push(delta, error)
        num_new = stream.next_index - before
        if num_new:
            last = stream.last_token_time
            self.metrics.observe_tokens(stream.instance_id, num_new, None if last is None else now - last,
                                        now - stream.arrival_time if before == 0 else None)
            stream.last_token_time = now
        if stream.handoff_pending and stream.next_index and not stream.finished:
            self._hand_off(stream)
        if stream.finished:
            self._end(delta.request_id, delta.finish_reason or "error")

    def _instance_failed(self, handle: InstanceHandle, exc: Exception) -> None:
        """The instance is gone: out of dispatch; each of its requests resumes elsewhere or ends with an error."""
        if handle.state is InstanceState.FAILED:
            return
        log.error("instance %s failed: %s", handle.instance_id, exc)
        handle.state = InstanceState.FAILED
        handle.error = f"{type(exc).__name__}: {exc}"
        scheduler = self.scheduler_for(handle)
        if handle.instance_id in scheduler.views:
            scheduler.remove_instance(handle.instance_id)
        self._scaling_down.discard(handle.instance_id)
        self.metrics.forget_instance(handle.instance_id)
        self.metrics.instance_failures.inc()
        self._forget_peer(handle.instance_id)
        for stream in [s for s in self.streams.values() if s.instance_id == handle.instance_id]:
            if stream.request_id in self._migrating:
                # A commit may already have handed it to the destination: the migration's outcome decides.
                stream.resume_pending = True
            else:
                self._resume(stream)
        self._update_state_gauge()
        if self.restart_failed:
            self._num_starting += 1
            asyncio.create_task(self._replace(handle))

    def _forget_peer(self, instance_id: str) -> None:
        """The others drop what they keep for copying KV with the instance that is gone (gloo links)."""
        for other in self.handles.values():
            if other.instance_id != instance_id and other.state not in (InstanceState.STOPPED, InstanceState.FAILED):
                other.forget_peer(instance_id)

    def _resume(self, stream: RequestStream) -> None:
        """Re-prefill a request whose instance died (prompt + the tokens already streamed) on a healthy
        instance, so the client's stream goes on; if none can take it, end it with an error."""
        failed_id = stream.instance_id
        stream.resume_pending = False
        state = RequestState.of(stream.request, [])
        state.output_token_ids = list(stream.token_ids)
        state.num_computed_tokens = 0  # its KV died with the instance
        request = state.to_request()
        handle, problem = None, "no healthy instance can take it"
        for scheduler in self._schedulers_for_resume(failed_id):
            try:
                handle = scheduler.select_instance(request, time.monotonic(), for_move=True)
                handle.resume_request(state)
            except ValueError as exc:
                handle, problem = None, str(exc)
                continue
            scheduler.count_incoming(request, handle.instance_id)
            break
        if handle is None:
            self._end(stream.request_id, "error", f"instance {failed_id} failed and the request could not be "
                                                  f"resumed elsewhere: {problem}")
            return
        log.warning("request %s resumed on instance %s after instance %s failed (%d tokens re-prefilled)",
                    stream.request_id, handle.instance_id, failed_id, state.num_tokens)
        stream.instance_id = handle.instance_id
        stream.ahead.clear()  # whatever the dead instance sent past a gap will come again from the new one
        stream.num_resumes += 1
        self.metrics.resumes.inc()

    def _schedulers_for_resume(self, failed_id: str) -> list[GlobalScheduler]:
        # P/D: a request with output decodes, so a decode instance first; a prefill one will do.
        return [self.scheduler] if self.pd is None else [self.pd.decode, self.pd.prefill]

    async def _replace(self, failed: InstanceHandle) -> None:
        """--restart-failed: start an instance of the same role in place of a dead one."""
        try:
            handle = await self.add_instance(failed.role)
            log.warning("instance %s started in place of failed instance %s", handle.instance_id, failed.instance_id)
            self.metrics.restarts.inc()
        except Exception:
            log.exception("starting a replacement for instance %s failed", failed.instance_id)
        finally:
            self._num_starting -= 1

    # ---- live migration ---------------------------------------------------------------------------
    async def migrate(self, request_id: str, dst_id: str) -> Migration:
        """Move a live request to instance `dst_id` now; the finished `Migration` (committed or aborted).

        UnknownRequestError / UnknownInstanceError (nothing changed) if either
        is unknown; MigrationRefused if the order cannot start (same instance,
        already migrating, destination not taking work).
        """
        stream = self.streams.get(request_id)
        if stream is None:
            raise UnknownRequestError(request_id)
        dst = self.get_handle(dst_id)
        if dst.state is not InstanceState.READY:
            raise MigrationRefused(f"instance {dst_id} is {dst.state.value}: it takes no work")
        src = self.get_handle(stream.instance_id)
        return await asyncio.wrap_future(self._submit_migration(request_id, src, dst))

    def _submit_migration(self, request_id: str, src: InstanceHandle, dst: InstanceHandle) -> Future[Migration]:
        """Hand an order to the driver; the request counts as migrating until its outcome is settled here."""
        future = self.migrations.submit(request_id, src, dst)
        self._migrating.add(request_id)
        loop = asyncio.get_running_loop()
        # Runs after `_migrated` and `_migration_ended` (scheduled first, from the driver's thread).
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._migration_settled, request_id))
        return future

    def _migration_settled(self, request_id: str) -> None:
        """The migration's outcome is known here: if the request's instance died meanwhile, resume it now
        (unless a commit handed it to a live destination)."""
        self._migrating.discard(request_id)
        stream = self.streams.get(request_id)
        if stream is None or not stream.resume_pending:
            return
        owner = self.handles.get(stream.instance_id)
        if owner is not None and owner.state is not InstanceState.FAILED:
            stream.resume_pending = False
        else:
            self._resume(stream)

    def _order(self, order: MigrationOrder) -> None:
        src, dst = self.handles.get(order.src_id), self.handles.get(order.dst_id)
        if src is None or dst is None or dst.state is not InstanceState.READY or order.request_id not in self.streams:
            return
        try:
            self._submit_migration(order.request_id, src, dst)
        except MigrationRefused:
            pass  # already moving; the next tick sees fresher reports

    def _hand_off(self, stream: RequestStream) -> None:
        """P/D: the request has its first token; if it is on a prefill instance, move it to a decode instance."""
        stream.handoff_pending = False
        src_id = stream.instance_id
        outcome = self.pd.hand_off(stream.request, src_id, time.monotonic(),
                                   lambda dst: self._submit_migration(stream.request_id, self.handles[src_id], dst))
        if outcome.problem is not None:
            log.warning("P/D hand-off of %s: %s", stream.request_id, outcome.problem)

    async def _control_loop(self) -> None:
        """Every control interval: the migration policy's orders (and a drain's) over the pushed reports."""
        while True:
            await asyncio.sleep(self.control_interval)
            now = time.monotonic()
            try:
                orders = []
                # In P/D mode requests move prefill -> decode by hand-off only; the policies balance within a role.
                for scheduler in self.pd.schedulers if self.pd else (self.scheduler,):
                    orders += scheduler.migration_orders(now, self.migrations.num_active)
            except Exception:  # a policy bug must not stop serving; it is logged and retried next tick
                log.exception("control step failed")
                continue
            for order in orders:
                self._order(order)
            if self.policy.scaling is not None:
                self._autoscale(now)

    # ---- autoscaling --------------------------------------------------------------------------
    def _autoscale(self, now: float) -> None:
        """Carry out the scaling policy's decision (at its interval) and remove drained-down instances once empty."""
        for instance_id in list(self._scaling_down):
            self._remove_if_empty(instance_id)
        if now < self._next_scaling:
            return
        self._next_scaling = now + self.policy.scaling.interval
        try:
            action = self.scheduler.scaling_step(now, self._num_starting)
        except Exception:
            log.exception("scaling step failed")
            return
        if action.is_noop:
            return
        self.scaling_actions.append((now, action.num_add, action.drain_id))
        for _ in range(action.num_add):
            self._num_starting += 1
            asyncio.create_task(self._scale_up())
        if action.drain_id is not None and action.drain_id in self.handles:
            self.drain(action.drain_id)
            self._scaling_down.add(action.drain_id)

    async def _scale_up(self) -> None:
        try:
            await self.add_instance()
        except Exception:
            log.exception("starting an instance for autoscaling failed")
        finally:
            self._num_starting -= 1

    def _remove_if_empty(self, instance_id: str) -> None:
        """Stop a drained instance once the cluster's rule (`stop_if_drained`) lets it go."""
        handle = self.handles.get(instance_id)
        if handle is None or handle.state is not InstanceState.DRAINING:
            self._scaling_down.discard(instance_id)
            return
        has_requests = (handle.has_unfinished_requests
                        or any(s.instance_id == instance_id for s in self.streams.values()))
        if not stop_if_drained(self.scheduler_for(handle), instance_id, has_requests=has_requests,
                               num_migrations=self.migrations.num_active(instance_id)):
            return
        self._scaling_down.discard(instance_id)
        pump = self._pumps.pop(instance_id, None)
        if pump is not None:
            pump.cancel()
        self.metrics.forget_instance(instance_id)
        handle.state = InstanceState.STOPPED
        asyncio.create_task(handle.shutdown())
        self._forget_peer(instance_id)
        self._update_state_gauge()

    def _migrated(self, m: Migration) -> None:
        """A commit (on the event loop): the owner map now points at the destination."""
        stream = self.streams.get(m.request_id)
        if stream is None:
            # The client left while the last copy was in flight; the destination owns an orphan now.
            dst = self.handles.get(m.dst_id)
            if dst is not None:
                dst.abort_request(m.request_id, time.monotonic())
            return
        stream.instance_id = m.dst_id

    def _migration_ended(self, m: Migration) -> None:
        self.metrics.observe_migration(m.src_id, m.dst_id, m.outcome, m.downtime)

    # ---- introspection ----------------------------------------------------------------------------
    def num_live_requests(self) -> int:
        return len(self.streams)

