"""Virtual usage and freeness (Llumnix Alg. 1), read from the instances' `LoadReport`s.

Units are KV blocks. For each request r on an instance:

- running: V(r) = blocks(r) + headroom(priority) / (running requests of that priority)
- the head-of-line waiting request: the blocks it needs for its tokens so far
- any other waiting request: 0
- an instance being drained: infinitely used (so migration empties it)

Blocks reserved for incoming migrations count as used. Summed over an
instance, the headroom of each priority present is counted once, whatever the
number of its requests. Freeness F = (M − ΣV) / B, M = KV capacity in blocks,
B = running batch size; F = +∞ when nothing runs (−∞ when draining): how many
more decode steps the batch can take.

Every comparison of instances is a strict total order, ties broken by instance
index: Llumnix's own load comparison once broke this and starved instances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # annotations only: the CLI reads scaling defaults without importing the engine
    from shunter.engine import LoadReport

INF = math.inf


@dataclass
class LoadConfig:
    """How virtual usage is counted.

    priority_headroom: blocks of headroom per priority level (shared among that
        level's running requests); levels not listed have none. High-priority
        requests get headroom so that dispatch avoids, and migration unloads,
        the instances they run on.
    """

    priority_headroom: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for priority, blocks in self.priority_headroom.items():
            if not isinstance(blocks, int) or blocks < 0:
                raise ValueError(f"headroom of priority {priority} must be a non-negative block count, got {blocks!r}")

    def headroom(self, report: LoadReport) -> int:
        """Σ over priorities present on the instance of their headroom (each counted once)."""
        if not self.priority_headroom:
            return 0
        return sum(self.priority_headroom.get(p, 0) for p in report.priority_to_num_running)


def kv_demand_blocks(report: LoadReport, config: LoadConfig) -> int:
    """Blocks an instance's requests hold or wait for: used (reservations included), every waiting
    request's blocks (not only the head of line's, as in virtual usage) and priority headroom."""
    return report.num_used_blocks + report.waiting_block_demand + config.headroom(report)


def virtual_usage(report: LoadReport, config: LoadConfig, is_draining: bool = False) -> float:
    """ΣV of an instance, in blocks (+∞ when draining)."""
    if is_draining:
        return INF
    return report.num_used_blocks + report.head_block_demand + config.headroom(report)


def freeness(report: LoadReport, config: LoadConfig, is_draining: bool = False) -> float:
    """F = (M − ΣV) / B; +∞ when nothing runs, −∞ when draining. Never NaN."""
    if is_draining:
        return -INF
    if report.num_running == 0:
        return INF
    return (report.num_total_blocks - virtual_usage(report, config)) / report.num_running


def freest_first(values: Sequence[float]) -> list[int]:
    """Indices by descending value, ties by ascending index: a strict total order."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def least_free_first(values: Sequence[float]) -> list[int]:
    """Indices by ascending value, ties by ascending index: a strict total order."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the lowest index among equals."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def argmin(values: Sequence[float]) -> int:
    """Index of the smallest value, the lowest index among equals."""
    best = 0
    for i in range(1, len(values)):
        if values[i] < values[best]:
            best = i
    return best
