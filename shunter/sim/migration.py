"""Live migration in simulation (Llumnix §4), through the engine's own migration hooks.

Stages: the first copies the blocks holding the request's computed tokens
while it keeps decoding on the source; each later stage copies the blocks
filled meanwhile. When at most `final_stage_max_blocks` new blocks remain (or
after `max_stages` stages) the final stage suspends the request — it is
exported and released on the source — copies the rest, and commits it on the
destination (`import_request`). Before every stage the destination reserves
blocks (`reserve_blocks`); a refusal, or the request finishing, being aborted
or preempted on the source, aborts the migration and frees the reservation.
At every instant exactly one instance owns the request (the source until the
final stage, the migration itself during the last copy, then the destination).

There is no migration policy yet: migrations are started explicitly
(`Simulator.schedule_migration`) or by the global scheduler's control step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shunter.engine.block_manager import cdiv
from shunter.engine.scheduler import RequestState

if TYPE_CHECKING:
    from shunter.sim.simulator import SimInstance


@dataclass
class MigrationConfig:
    """Cost model of moving KV between instances.

    bandwidth_bytes_per_s: copy rate between two instances (default 10 GB/s,
        a conservative cross-server figure: 100 Gb/s RDMA, or NCCL/Gloo over
        PCIe within a server).
    kv_bytes_per_block: bytes of one KV block (the simulate command sets it
        from the model; 0 makes copies cost only `stage_latency`).
    stage_latency: fixed seconds per stage (handshake, launch).
    max_stages: stages before the final one is forced.
    final_stage_max_blocks: the final stage starts once at most this many
        blocks are left to copy, so downtime stays one small copy.
    """

    bandwidth_bytes_per_s: float = 10e9
    kv_bytes_per_block: int = 0
    stage_latency: float = 1e-3
    max_stages: int = 8
    final_stage_max_blocks: int = 1

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError("migration bandwidth must be > 0")
        if self.kv_bytes_per_block < 0 or self.stage_latency < 0:
            raise ValueError("kv_bytes_per_block and stage_latency must be >= 0")
        if self.max_stages < 1 or self.final_stage_max_blocks < 0:
            raise ValueError("max_stages must be >= 1 and final_stage_max_blocks >= 0")

    def copy_time(self, num_blocks: int) -> float:
        return self.stage_latency + num_blocks * self.kv_bytes_per_block / self.bandwidth_bytes_per_s


@dataclass
class Migration:
    """One request's move from `src` to `dst`, stage by stage."""

    request_id: str
    src: SimInstance
    dst: SimInstance
    start_time: float
    num_stages: int = 0
    num_copied_blocks: int = 0
    num_preemptions: int = 0  # the request's count at the start: a change means it was preempted
    state: RequestState | None = None
    final_stage_time: float | None = None
    end_time: float | None = None
    outcome: str = "running"  # running | committed | aborted
    abort_reason: str | None = None
    blocks_per_stage: list[int] = field(default_factory=list)

    @property
    def downtime(self) -> float | None:
        """Seconds the request made no progress: the final copy (committed migrations only)."""
        if self.outcome != "committed" or self.final_stage_time is None or self.end_time is None:
            return None
        return self.end_time - self.final_stage_time

    def blocks_to_copy(self, num_computed_tokens: int, block_size: int) -> int:
        return cdiv(num_computed_tokens, block_size) - self.num_copied_blocks

    def to_json(self) -> dict:
        return {"request_id": self.request_id, "src": self.src.instance_id, "dst": self.dst.instance_id,
                "start_time": self.start_time, "end_time": self.end_time, "outcome": self.outcome,
                "abort_reason": self.abort_reason, "stages": self.num_stages, "downtime": self.downtime,
                "blocks_per_stage": self.blocks_per_stage}
