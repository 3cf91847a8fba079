"""What an instance says about its own load: the engine writes it, the cluster reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LoadReport:
    """A snapshot of one instance's queues and KV-cache occupancy, in blocks.

    block_size: tokens per KV block on this instance.
    num_used_blocks counts every block not free, the blocks reserved for
    incoming migrations (`num_reserved_blocks`) included.
    head_block_demand: blocks the head-of-line waiting request needs for its
        tokens so far (0 when nothing waits).
    waiting_block_demand: the same summed over every waiting request
        (preempted ones included).
    num_pending_prefill_tokens: tokens still to compute before the queued and
        running requests can decode (waiting prompts and unfinished prefills).
    priority_to_num_running: running requests per priority (the headroom of
        a priority's virtual usage is shared among them).
    num_migrating: requests being migrated away from this instance.
    num_incoming: migrations into this instance holding a reservation.
    """

    instance_id: str
    time: float
    num_running: int
    num_waiting: int
    num_preempted: int
    num_used_blocks: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int = 16
    num_reserved_blocks: int = 0
    head_block_demand: int = 0
    waiting_block_demand: int = 0
    num_pending_prefill_tokens: int = 0
    priority_to_num_running: dict[int, int] = field(default_factory=dict)
    num_migrating: int = 0
    num_incoming: int = 0

    @property
    def block_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.num_used_blocks / self.num_total_blocks

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}
