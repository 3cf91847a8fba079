"""What an instance tells the global scheduler about its load."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LoadReport:
    """A snapshot of one instance's queues and KV-cache occupancy, in blocks.

    `waiting_block_demands[i]` is how many blocks the i-th waiting request (in
    admission order) needs for its tokens so far; the head of line is first.
    `priority_to_num_running` counts running requests per priority (the
    headroom of virtual usage is shared among them).
    """

    instance_id: str
    time: float
    num_running: int
    num_waiting: int
    num_preempted: int
    num_used_blocks: int
    num_free_blocks: int
    num_total_blocks: int
    waiting_block_demands: list[int] = field(default_factory=list)
    priority_to_num_running: dict[int, int] = field(default_factory=dict)

    @property
    def block_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return self.num_used_blocks / self.num_total_blocks
