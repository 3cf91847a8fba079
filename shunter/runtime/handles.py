"""The frontend's handle on one instance, and the in-process kind.

A handle is what the global scheduler dispatches to (it satisfies the cluster's
`Instance` calls for dispatch) and what the frontend's pump polls for step
messages. Commands are fire-and-forget: a request's fate comes back through
its deltas, never through a per-request round trip. The load the global
scheduler sees is the last report the instance pushed, never a fresh query.

`LocalInstance` runs an `EngineLoop` in this process (tests, the null-engine
benchmark); `shunter.runtime.ray_instance.RayInstance` runs it in a Ray actor.
"""

from __future__ import annotations

import asyncio
import enum
import os
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Callable

from shunter.config import SchedulerConfig
from shunter.engine import LoadReport
from shunter.engine.scheduler import MigrationCandidate, RequestState, fit_problem
from shunter.request import Request, TokenDelta
from shunter.runtime.engine_loop import EngineLoop, StepMessage
from shunter.runtime.spec import InstanceSpec, build_engine


class NoInstanceError(RuntimeError):
    """No instance can take a request now (none ready, or all draining)."""


class InstanceDied(RuntimeError):
    """The instance's process (or, in-process, its loop thread) is gone."""


class CopyTimedOut(TimeoutError):
    """A KV copy took longer than its stage may. The copy may still write its target blocks:
    `wait()` returns once it has stopped, and only then may those blocks be freed."""

    def __init__(self, message: str, wait: Callable[[], object]) -> None:
        super().__init__(message)
        self.wait = wait


class InstanceState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class InstanceHandle:
    """One instance as the frontend sees it: id, role, state, limits, last report.

    `kind` is "shunter" for Shunter's own instances (an engine loop in this
    process or a Ray actor: token ids stream back, requests can migrate) and
    "remote" for a remote OpenAI server (`shunter.gateway.remote`).
    """

    kind = "shunter"

    def __init__(self, instance_id: str, spec: InstanceSpec, role: str = "mixed") -> None:
        self.instance_id = instance_id
        self.spec = spec
        self.role = role
        self.state = InstanceState.STARTING
        self.config: SchedulerConfig | None = None
        self.facts: dict = {}
        self.last_report: LoadReport | None = None
        self.candidates: list[MigrationCandidate] = []  # pushed with each report
        self.error: str | None = None

    # ---- the cluster's Instance calls used by dispatch -----------------------------------
    def validate(self, request: Request) -> None:
        """ValueError if `request` could never run here (checked before anything is sent)."""
        if self.config is None:
            raise ValueError(f"instance {self.instance_id} is not ready")
        problem = fit_problem(self.config, request.request_id, request.num_tokens,
                              request.num_prompt_tokens + request.sampling_params.max_tokens)
        if problem is not None:
            raise ValueError(problem)

    def add_request(self, request: Request) -> None:
        """Validate, then send the request; its tokens (or its refusal) come back as deltas."""
        self.validate(request)
        self._send_add(request)

    def resume_request(self, state: RequestState) -> None:
        """Take over `state` (no KV: its instance died) and re-prefill it; ValueError (nothing sent) if it
        could never run here. Its further tokens, or its refusal, come back as deltas."""
        if self.config is None:
            raise ValueError(f"instance {self.instance_id} is not ready")
        problem = fit_problem(self.config, state.request_id, state.num_tokens,
                              len(state.prompt_token_ids) + state.sampling_params.max_tokens)
        if problem is not None:
            raise ValueError(problem)
        self._send_resume(state)

    def abort_request(self, request_id: str, now: float) -> TokenDelta | None:
        """Send an abort; the closing delta comes back through the outbox (None here)."""
        self._send_abort(request_id)
        return None

    def finish_request(self, request_id: str) -> None:
        """The frontend matched a stop string: end the request there and free its blocks."""
        self._send_finish(request_id)

    def load_report(self, now: float) -> LoadReport:
        if self.last_report is None:
            raise ValueError(f"instance {self.instance_id} has not reported yet")
        return self.last_report

    def migration_candidates(self) -> list[MigrationCandidate]:
        """What the instance last said could migrate away (pushed with its report)."""
        return self.candidates

    @property
    def has_unfinished_requests(self) -> bool:
        r = self.last_report
        return r is not None and (r.num_running + r.num_waiting) > 0

    def describe(self) -> dict:
        """The admin API's view of this instance."""
        return {
            "id": self.instance_id,
            "kind": self.kind,
            "role": self.role,
            "state": self.state.value,
            "load": self.last_report.to_json() if self.last_report is not None else None,
            "config": None if self.config is None else {
                "num_blocks": self.config.num_blocks, "block_size": self.config.block_size,
                "max_num_seqs": self.config.max_num_seqs, "max_model_len": self.config.max_model_len,
                "max_num_batched_tokens": self.config.max_num_batched_tokens},
            "facts": self.facts,
            "error": self.error,
        }

    # ---- what each kind implements -------------------------------------------------------------
    async def start(self) -> None:
        """Build the engine and start its loop; sets `config`, `facts`, the first report, READY."""
        raise NotImplementedError

    async def poll(self, after_seq: int, timeout: float) -> list[StepMessage]:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    async def recorded_steps(self) -> list:
        """Every step so far as a `ProfileStep` (batch summary, wall time), if the spec asked for `record_steps`."""
        raise NotImplementedError

    # ---- blocking calls, for the migration driver's thread (never the event loop) ---------------
    # copy_safe: KV copies run beside the instances' steps, not between them. That is safe because
    # the coordinator only ever copies blocks nobody writes while the copy runs: full blocks of the
    # migrating request (a non-final stage: its new tokens go into later blocks), every block of a
    # suspended request (the final stage: it is not scheduled), and, on the destination, blocks
    # reserved for this migration, which no running request's block table holds.
    def engine_call(self, name: str, *args, timeout: float = 30.0):
        """`engine.<name>(*args)` on the instance, between two of its steps; its result."""
        raise NotImplementedError

    def copy_blocks(self, dst: InstanceHandle, src_block_ids: list[int], dst_block_ids: list[int],
                    timeout: float = 60.0, background: bool = False) -> None:
        """Copy these KV blocks (all layers) of this instance into `dst_block_ids` of `dst`;
        CopyTimedOut if that takes longer than `timeout` seconds. `background`: the request still
        decodes meanwhile, so the copy may be paced (`InstanceSpec.migration_copy_rate`)."""
        raise NotImplementedError

    def forget_peer(self, instance_id: str) -> None:
        """Instance `instance_id` is gone: drop whatever this instance keeps for copying KV with it
        (nothing here; a Ray instance's gloo links, `--kv-channel torch-distributed`)."""

    def _send_add(self, request: Request) -> None:
        raise NotImplementedError

    def _send_resume(self, state: RequestState) -> None:
        raise NotImplementedError

    def _send_abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _send_finish(self, request_id: str) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.instance_id!r}, {self.state.value})"


_COPIERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-copy")  # in-process instances' KV copies


class LocalInstance(InstanceHandle):
    """An instance whose engine loop is a thread of this process."""

    def __init__(self, instance_id: str, spec: InstanceSpec, role: str = "mixed", engine=None) -> None:
        super().__init__(instance_id, spec, role)
        self._engine = engine  # prebuilt (tests pass one with a fake executor); else built from `spec`
        self.loop: EngineLoop | None = None
        self._pushed: asyncio.Event | None = None

    async def start(self) -> None:
        engine, facts = (self._engine, {"executor": "given"}) if self._engine is not None else \
            await asyncio.to_thread(build_engine, self.spec, self.instance_id)
        # The loop thread wakes the poller through the event loop: no thread sits blocked in `poll`.
        aio_loop = asyncio.get_running_loop()
        pushed = self._pushed = asyncio.Event()
        self.loop = EngineLoop(engine, self.spec.report_interval,
                               on_push=lambda: aio_loop.call_soon_threadsafe(pushed.set),
                               record_steps=self.spec.record_steps)
        self.config = engine.config
        self.facts = {**facts, "pid": os.getpid()}
        self.loop.start()
        self.last_report = await asyncio.wrap_future(self.loop.load_report())
        self.state = InstanceState.READY

    def _check_alive(self) -> None:
        # A loop thread that has ended is this kind's dead process: callers must not wait on it.
        if not self.loop.is_alive:
            raise InstanceDied(f"instance {self.instance_id}'s engine loop has stopped")

    async def poll(self, after_seq: int, timeout: float) -> list[StepMessage]:
        self._check_alive()
        self._pushed.clear()  # before looking: a push after this sets it again
        messages = self.loop.poll(after_seq, 0.0)
        if not messages:
            try:
                await asyncio.wait_for(self._pushed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            messages = self.loop.poll(after_seq, 0.0)
        return messages

    async def shutdown(self) -> None:
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)
        self.state = InstanceState.STOPPED

    async def recorded_steps(self) -> list:
        return list(self.loop.step_log or [])

    def engine_call(self, name: str, *args, timeout: float = 30.0):
        self._check_alive()
        return self.loop.engine_call(name, *args).result(timeout)

    def copy_blocks(self, dst: InstanceHandle, src_block_ids: list[int], dst_block_ids: list[int],
                    timeout: float = 60.0, background: bool = False) -> None:
        self._check_alive()
        dst._check_alive()
        # Beside the steps, not between them: see `copy_safe`. In a thread of its own so that a copy
        # that hangs (a stuck device) times out instead of holding the migration forever.
        future = _COPIERS.submit(lambda: dst.loop.engine.executor.write_blocks(
            dst_block_ids, self.loop.engine.executor.read_blocks(src_block_ids)))
        try:
            future.result(timeout)
        except FutureTimeout:
            raise CopyTimedOut(f"copying {len(src_block_ids)} KV blocks from instance {self.instance_id} to "
                               f"{dst.instance_id} took over {timeout:g} s", future.exception) from None

    def _send_add(self, request: Request) -> None:
        self.loop.add_request(request)

    def _send_resume(self, state: RequestState) -> None:
        self.loop.resume_request(state)

    def _send_abort(self, request_id: str) -> None:
        self.loop.abort_request(request_id)

    def _send_finish(self, request_id: str) -> None:
        self.loop.finish_request(request_id)
