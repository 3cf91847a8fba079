"""THE live-migration state machine (Llumnix §4), keyed by migration id.

Pure, synchronous, clock-free: every call takes `now`, and copying KV is the
driver's job. The simulator drives it with virtual time (a stage's copy takes
`MigrationConfig.copy_time`); real serving drives it with the wall clock and a
KV transport. Both call exactly this code.

A migration's life:

1. `MigrationCoordinator.start` refuses an order for a request that is already
   migrating, or whose source and destination are the same instance.
2. `advance` plans each stage. The first marks the request migrating on the
   source (it keeps decoding there) and asks the destination whether it can
   take it at all. A non-final stage copies the *full* blocks filled since the
   previous stage — a partly filled block is still being written on the
   source, so it is never counted as copied. Once at most
   `final_stage_max_blocks` blocks are left (or after `max_stages` stages) the
   final stage suspends the request on the source and copies everything left,
   the partial last block included. Before every stage the destination grows
   the migration's reservation; a refusal aborts.
3. After the final copy, `commit` imports the request on the destination and
   releases it on the source. Downtime is the final copy alone.
4. `abort` — the destination refused, the request finished, was aborted or
   preempted on the source, or the driver gave up — frees exactly this
   migration's reservation and lets the request run on at the source.

A waiting or preempted request holds no KV: it moves in one step (`advance`
hands it over and commits), which is a cheap way to cut queueing.

At every instant exactly one instance owns the request: the source until
commit (suspended during the final copy), the destination from commit on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from shunter.engine.block_manager import cdiv
from shunter.engine.scheduler import MigrationSnapshot, RequestState
from shunter.registry import Registry

# Link bandwidths in bytes/s, effective for bulk copies (about 80 % of the line rate).
LINKS: Registry[float] = Registry("link")
LINKS.register("pcie-gen4", 25e9)
LINKS.register("pcie-gen5", 50e9)
LINKS.register("nvlink", 300e9)  # A100 NVLink 3, one direction
LINKS.register("eth-25g", 25e9 / 8 * 0.8)
LINKS.register("eth-100g", 100e9 / 8 * 0.8)
LINKS.register("eth-400g", 400e9 / 8 * 0.8)

DEFAULT_LINK = "eth-100g"


@dataclass
class MigrationConfig:
    """How migrations run and what a copy costs.

    bandwidth_bytes_per_s: copy rate between two instances (default: the
        `eth-100g` link; `MigrationConfig.for_link(name)` picks another).
    kv_bytes_per_block: bytes of one KV block, all layers (the simulator sets
        it from the model; 0 makes a copy cost only `stage_latency`).
    stage_latency: fixed seconds per stage (handshake, launch).
    max_stages: most stages, the final one included (1: a blocking stop-and-copy).
    final_stage_max_blocks: the final stage starts once at most this many
        blocks are left to copy, so downtime stays one small copy.
    """

    bandwidth_bytes_per_s: float = LINKS.get(DEFAULT_LINK)
    kv_bytes_per_block: int = 0
    stage_latency: float = 1e-3
    max_stages: int = 8
    final_stage_max_blocks: int = 1

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"migration bandwidth must be > 0 bytes/s, got {self.bandwidth_bytes_per_s!r}")
        if self.kv_bytes_per_block < 0:
            raise ValueError(f"kv_bytes_per_block must be >= 0, got {self.kv_bytes_per_block!r}")
        if not self.stage_latency >= 0:
            raise ValueError(f"stage_latency must be >= 0 seconds, got {self.stage_latency!r}")
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages!r}")
        if self.final_stage_max_blocks < 0:
            raise ValueError(f"final_stage_max_blocks must be >= 0, got {self.final_stage_max_blocks!r}")

    @classmethod
    def for_link(cls, link: str, **kw) -> MigrationConfig:
        """A config whose bandwidth is that of the named link (`LINKS`)."""
        return cls(bandwidth_bytes_per_s=LINKS.get(link), **kw)

    def copy_time(self, num_blocks: int) -> float:
        """Seconds one stage takes to copy `num_blocks` blocks."""
        return self.stage_latency + num_blocks * self.kv_bytes_per_block / self.bandwidth_bytes_per_s


class MigrationEndpoint(Protocol):
    """The calls a migration makes on its source and destination instances."""

    instance_id: str

    def begin_migration(self, request_id: str) -> MigrationSnapshot | None: ...
    def migration_progress(self, request_id: str) -> MigrationSnapshot | None: ...
    def suspend_migrating(self, request_id: str) -> RequestState | None: ...
    def end_migration(self, request_id: str) -> None: ...
    def release_migrated(self, request_id: str, now: float) -> bool: ...
    def export_waiting(self, request_id: str, now: float) -> RequestState | None: ...
    def migration_refusal(self, request_id: str, num_tokens: int, max_num_tokens: int,
                          needs_seat: bool = True) -> str | None: ...
    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> list[int] | None: ...
    def reserved_block_ids(self, migration_id: str) -> list[int]: ...
    def cancel_migration(self, migration_id: str) -> int: ...
    def import_request(self, state: RequestState, migration_id: str | None = None): ...


class MigrationRefused(ValueError):
    """An order that cannot start: the request is already migrating, or source == destination."""


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage's copy: `src_block_ids[i]` on the source goes to `dst_block_ids[i]` on the destination.

    After the copy the driver calls `advance` again (non-final) or `commit` (final).
    """

    stage: int
    src_block_ids: list[int]
    dst_block_ids: list[int]
    is_final: bool

    @property
    def num_blocks(self) -> int:
        return len(self.src_block_ids)


RUNNING, COMMITTED, ABORTED = "running", "committed", "aborted"


@dataclass
class Migration:
    """One request's move from `src` to `dst`, stage by stage (read its fields; `MigrationCoordinator` writes them)."""

    migration_id: str
    request_id: str
    src: MigrationEndpoint
    dst: MigrationEndpoint
    start_time: float
    num_stages: int = 0
    num_copied_blocks: int = 0
    blocks_per_stage: list[int] = field(default_factory=list)
    is_waiting: bool = False  # moved without KV
    dst_block_ids: list[int] = field(default_factory=list)  # the destination's reservation, as it grew
    state: RequestState | None = None  # set by the final stage
    final_stage_time: float | None = None
    end_time: float | None = None
    outcome: str = RUNNING
    abort_reason: str | None = None

    @property
    def src_id(self) -> str:
        return self.src.instance_id

    @property
    def dst_id(self) -> str:
        return self.dst.instance_id

    @property
    def is_active(self) -> bool:
        return self.outcome == RUNNING

    @property
    def downtime(self) -> float | None:
        """Seconds the request made no progress: the final copy (committed KV migrations only)."""
        if self.outcome != COMMITTED or self.final_stage_time is None or self.end_time is None:
            return None
        return self.end_time - self.final_stage_time

    def to_json(self, kv_bytes_per_block: int = 0) -> dict:
        return {"migration_id": self.migration_id, "request_id": self.request_id, "src": self.src_id,
                "dst": self.dst_id, "start_time": self.start_time, "end_time": self.end_time,
                "outcome": self.outcome, "abort_reason": self.abort_reason, "stages": self.num_stages,
                "waiting": self.is_waiting, "downtime": self.downtime, "blocks_per_stage": self.blocks_per_stage,
                "copied_bytes": self.num_copied_blocks * kv_bytes_per_block}


class MigrationCoordinator:
    """Every migration in flight, keyed by migration id; at most one per request."""

    def __init__(self, config: MigrationConfig, block_size: int, ids: Iterator[int] | None = None) -> None:
        self.config = config
        self.block_size = block_size
        self._ids = ids if ids is not None else itertools.count()
        self.active: dict[str, Migration] = {}
        self.request_to_migration: dict[str, str] = {}
        self.instance_to_num_active: dict[str, int] = {}

    # ---- orders ---------------------------------------------------------------------
    def refusal(self, request_id: str, src_id: str, dst_id: str) -> str | None:
        """Why an order cannot start (None if it can)."""
        if src_id == dst_id:
            return f"request {request_id!r}: source and destination are the same instance {src_id!r}"
        if request_id in self.request_to_migration:
            return f"request {request_id!r} is already migrating ({self.request_to_migration[request_id]})"
        return None

    def start(self, request_id: str, src: MigrationEndpoint, dst: MigrationEndpoint, now: float) -> Migration:
        """Open a migration; `advance` plans its first stage. MigrationRefused if the order is invalid."""
        reason = self.refusal(request_id, src.instance_id, dst.instance_id)
        if reason is not None:
            raise MigrationRefused(reason)
        m = Migration(f"m{next(self._ids)}", request_id, src, dst, now)
        self.active[m.migration_id] = m
        self.request_to_migration[request_id] = m.migration_id
        for iid in (src.instance_id, dst.instance_id):
            self.instance_to_num_active[iid] = self.instance_to_num_active.get(iid, 0) + 1
        return m

    def num_active(self, instance_id: str) -> int:
        """Migrations in flight with this instance as source or destination."""
        return self.instance_to_num_active.get(instance_id, 0)

    # ---- stages -----------------------------------------------------------------------
    def advance(self, m: Migration, now: float) -> StagePlan | None:
        """Plan the next stage and reserve its blocks on the destination.

        Returns the copy to make, or None when the migration has ended here:
        aborted (see `m.abort_reason`) or, for a waiting request, committed.
        """
        if not m.is_active:
            raise ValueError(f"migration {m.migration_id} has ended ({m.outcome})")
        rid = m.request_id
        if m.num_stages == 0:
            snap = m.src.begin_migration(rid)
            if snap is None:
                self.abort(m, now, "the request is not running or waiting on the source")
                return None
            m.is_waiting = snap.is_waiting
            reason = m.dst.migration_refusal(rid, snap.num_tokens, snap.max_num_tokens, needs_seat=not snap.is_waiting)
            if reason is not None:
                self.abort(m, now, f"the destination refused: {reason}")
                return None
            if snap.is_waiting:
                self._move_waiting(m, now)
                return None
        else:
            snap = m.src.migration_progress(rid)
            if snap is None:
                self.abort(m, now, "the request finished, was aborted or was preempted on the source")
                return None
        bs = self.block_size
        num_blocks = cdiv(snap.num_computed_tokens, bs)
        is_final = (m.num_stages > 0 and num_blocks - m.num_copied_blocks <= self.config.final_stage_max_blocks
                    or m.num_stages + 1 >= self.config.max_stages)
        if is_final:
            state = m.src.suspend_migrating(rid)
            if state is None:
                self.abort(m, now, "the request finished, was aborted or was preempted on the source")
                return None
            m.state = state
            m.final_stage_time = now
            src_block_ids = state.block_ids
            end, num_tokens = cdiv(state.num_computed_tokens, bs), state.num_computed_tokens
        else:
            # Only full blocks: the partly filled last block is still being written on the source.
            src_block_ids = snap.block_ids
            end = snap.num_computed_tokens // bs
            num_tokens = end * bs
        if num_tokens:
            added = m.dst.reserve_migration(m.migration_id, rid, num_tokens)
            if added is None:
                self.abort(m, now, "the destination has no free blocks")
                return None
            # The reservation grows by appending: the coordinator keeps its table (no extra call per stage).
            m.dst_block_ids.extend(added)
        start = m.num_copied_blocks
        dst_block_ids = m.dst_block_ids
        plan = StagePlan(m.num_stages, list(src_block_ids[start:end]), list(dst_block_ids[start:end]), is_final)
        m.num_stages += 1
        m.num_copied_blocks = max(start, end)
        m.blocks_per_stage.append(plan.num_blocks)
        return plan

    def commit(self, m: Migration, now: float) -> bool:
        """After the final copy: the destination takes the request over. False if it aborted instead."""
        if not m.is_active or m.state is None:
            raise ValueError(f"migration {m.migration_id} is not in its final stage")
        if m.src.migration_progress(m.request_id) is None:  # aborted by its client during the final copy
            self.abort(m, now, "the request was aborted on the source during the final copy")
            return False
        try:
            m.dst.import_request(m.state, m.migration_id)
        except ValueError as e:
            self.abort(m, now, f"the destination refused the import: {e}")
            return False
        # The destination owns the request from here on, whatever the source answers (a dead source's
        # blocks died with it): the migration is committed even if telling the source fails.
        try:
            m.src.release_migrated(m.request_id, now)
        finally:
            self._end(m, now, COMMITTED)
        return True

    def abort(self, m: Migration, now: float, reason: str) -> None:
        """End the migration: free exactly its reservation; the request runs on at the source.

        Each side is told on its own: one that cannot be reached (dead, or not answering) does not keep
        the other from freeing its part; the migration ends either way, then the first failure is raised.
        """
        if not m.is_active:
            return
        failures: list[Exception] = []
        try:
            m.dst.cancel_migration(m.migration_id)
        except Exception as exc:
            failures.append(exc)
        if not m.is_waiting:
            try:
                m.src.end_migration(m.request_id)
            except Exception as exc:
                failures.append(exc)
        m.abort_reason = reason
        self._end(m, now, ABORTED)
        if failures:
            raise failures[0]

    # ---- internals ----------------------------------------------------------------------
    def _move_waiting(self, m: Migration, now: float) -> None:
        state = m.src.export_waiting(m.request_id, now)
        if state is None:
            self.abort(m, now, "the request is no longer waiting on the source")
            return
        try:
            m.dst.import_request(state)
        except Exception as e:  # refused (checked first, yet) or unreachable: put it back rather than lose it
            m.src.import_request(state)
            self.abort(m, now, f"the destination refused the import: {e}")
            if not isinstance(e, ValueError):
                raise
            return
        m.final_stage_time = now
        self._end(m, now, COMMITTED)

    def _end(self, m: Migration, now: float, outcome: str) -> None:
        m.outcome = outcome
        m.end_time = now
        del self.active[m.migration_id]
        del self.request_to_migration[m.request_id]
        for iid in (m.src_id, m.dst_id):
            self.instance_to_num_active[iid] -= 1
