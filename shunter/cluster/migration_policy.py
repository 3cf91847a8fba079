"""Migration policies, registered by name: which instances pair up, and which request moves.

Pairing (global, from load reports only) picks (source, destination) pairs;
selection (on the source's list of candidates) picks the request to move.
This is Llumnix's split: the global scheduler pairs instances, each source
chooses what to send. Both are plain functions of their arguments, ties
broken by index or request id, so simulations repeat exactly.

Adding a policy is one function plus its decorator line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from shunter.cluster.load import INF, LoadConfig, freeness
from shunter.engine import LoadReport
from shunter.engine.scheduler import MigrationCandidate
from shunter.registry import Registry

# Requests of a priority above this are never moved away (they keep their instance's headroom).
NORMAL_PRIORITY = 0


@dataclass
class MigrationPolicyConfig:
    """Thresholds of migration pairing and the choice of request.

    src_freeness: an instance with freeness below this is a source (so is one
        with waiting or preempted requests when `move_waiting`, and a draining one).
    dst_freeness: an instance with freeness above this can be a destination.
    max_per_instance: most migrations in flight per instance (as source or destination).
    selection: which request a source sends (`MIGRATION_SELECTION`).
    move_waiting: also move waiting and preempted requests (no KV to copy).
    balance_margin: the `balance` policy moves load from instances whose KV
        demand exceeds the mean by this fraction of capacity to those below it by as much.
    """

    src_freeness: float = 8.0
    dst_freeness: float = 32.0
    max_per_instance: int = 1
    selection: str = "shortest"
    move_waiting: bool = True
    balance_margin: float = 0.1

    def __post_init__(self) -> None:
        if not self.dst_freeness >= self.src_freeness:
            raise ValueError(f"the destination freeness threshold ({self.dst_freeness!r}) must be at least the "
                             f"source threshold ({self.src_freeness!r})")
        if not isinstance(self.max_per_instance, int) or self.max_per_instance < 1:
            raise ValueError(f"max migrations per instance must be a positive integer, got {self.max_per_instance!r}")
        MIGRATION_SELECTION.get(self.selection)


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance as pairing sees it: its report (the dispatcher's view), whether it is draining,
    and how many migrations it has in flight."""

    report: LoadReport
    is_draining: bool
    num_migrations: int


PairingPolicy = Callable[[Sequence[InstanceLoad], MigrationPolicyConfig, LoadConfig], list[tuple[int, int]]]
SelectionPolicy = Callable[[Sequence[MigrationCandidate], bool], MigrationCandidate | None]

MIGRATION: Registry[PairingPolicy] = Registry("migration policy")
MIGRATION_SELECTION: Registry[SelectionPolicy] = Registry("migration selection")


@MIGRATION.register("none")
def no_migration(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig, load: LoadConfig) -> list[tuple[int, int]]:
    """Never migrate."""
    return []


@MIGRATION.register("llumnix")
def llumnix_pairing(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig,
                    load: LoadConfig) -> list[tuple[int, int]]:
    """Llumnix: the least free sources paired with the freest destinations, one pair each.

    Sources: freeness below `src_freeness`, waiting or preempted requests (with
    `move_waiting`), or draining. Destinations: freeness above `dst_freeness`,
    not draining, not a source. Instances at their migration limit sit out.
    """
    f = [freeness(x.report, load, x.is_draining) for x in loads]
    free_slots = [x.num_migrations < cfg.max_per_instance for x in loads]
    sources = [i for i, x in enumerate(loads) if free_slots[i] and _has_movable(x) and (
        x.is_draining or f[i] < cfg.src_freeness or (cfg.move_waiting and x.report.num_waiting > 0))]
    is_source = set(sources)
    dests = [i for i, x in enumerate(loads)
             if free_slots[i] and not x.is_draining and i not in is_source and f[i] > cfg.dst_freeness]
    sources.sort(key=lambda i: (f[i], i))
    dests.sort(key=lambda i: (-f[i], i))
    return list(zip(sources, dests))


@MIGRATION.register("balance")
def balance_pairing(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig,
                    load: LoadConfig) -> list[tuple[int, int]]:
    """Shunter's: keep every instance's KV demand near the cluster mean.

    Demand = (used blocks + every waiting request's blocks + priority headroom)
    / capacity: unlike freeness it sees the whole queue, and it does not wait
    for an instance to run nearly out of blocks. Sources: demand above the mean
    by more than `balance_margin` (or draining); destinations: below the mean
    by more than the margin. Highest demand pairs with lowest.
    """
    d = [INF if x.is_draining else (x.report.num_used_blocks + x.report.waiting_block_demand
                                    + load.headroom(x.report)) / x.report.num_total_blocks for x in loads]
    live = [v for v in d if v != INF]
    if not live:
        return []
    mean = sum(live) / len(live)
    margin = cfg.balance_margin
    free_slots = [x.num_migrations < cfg.max_per_instance for x in loads]
    sources = [i for i, x in enumerate(loads) if free_slots[i] and _has_movable(x) and d[i] > mean + margin]
    dests = [i for i, x in enumerate(loads) if free_slots[i] and not x.is_draining and d[i] < mean - margin]
    sources.sort(key=lambda i: (-d[i], i))
    dests.sort(key=lambda i: (d[i], i))
    return list(zip(sources, dests))


def _has_movable(x: InstanceLoad) -> bool:
    r = x.report
    return r.num_running - r.num_migrating > 0 or r.num_waiting > 0


def _movable(candidates: Sequence[MigrationCandidate], move_waiting: bool) -> tuple[list, list]:
    running = [c for c in candidates if not c.is_waiting and c.priority <= NORMAL_PRIORITY]
    waiting = [c for c in candidates if c.is_waiting and c.priority <= NORMAL_PRIORITY] if move_waiting else []
    return running, waiting


def _select(candidates, move_waiting, key) -> MigrationCandidate | None:
    running, waiting = _movable(candidates, move_waiting)
    if waiting:  # no KV to copy: the cheapest move, and it cuts queueing at once (the head of line first)
        return waiting[0]
    return min(running, key=key, default=None)


@MIGRATION_SELECTION.register("shortest")
def shortest_first(candidates: Sequence[MigrationCandidate], move_waiting: bool) -> MigrationCandidate | None:
    """The running request with the fewest KV blocks (cheapest to copy; Llumnix's default)."""
    return _select(candidates, move_waiting, lambda c: (c.num_blocks, c.arrival_time, c.request_id))


@MIGRATION_SELECTION.register("longest")
def longest_first(candidates: Sequence[MigrationCandidate], move_waiting: bool) -> MigrationCandidate | None:
    """The running request with the most KV blocks (frees the most memory per move)."""
    return _select(candidates, move_waiting, lambda c: (-c.num_blocks, c.arrival_time, c.request_id))


@MIGRATION_SELECTION.register("last-arrived")
def last_arrived(candidates: Sequence[MigrationCandidate], move_waiting: bool) -> MigrationCandidate | None:
    """The running request that arrived last (it would be preempted first)."""
    return _select(candidates, move_waiting, lambda c: (-c.arrival_time, c.request_id))
