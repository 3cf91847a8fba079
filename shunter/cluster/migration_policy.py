"""Migration policies, registered by name: which instances pair up, and which request moves.

Pairing (global, from load reports only) picks (source, destination) pairs;
selection (on the source's list of candidates) picks the request to move.
This is Llumnix's split: the global scheduler pairs instances, each source
chooses what to send. Both are plain functions of their arguments, ties
broken by index or request id, so simulations repeat exactly.

Adding a policy is one function plus its decorator line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from shunter.cluster.load import LoadConfig, freeness
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
    memory_reserve: the `shunter` policy sends a queued request only to an
        instance that keeps this fraction of its KV capacity free after taking it.
    """

    src_freeness: float = 8.0
    dst_freeness: float = 32.0
    max_per_instance: int = 1
    selection: str = "shortest"
    move_waiting: bool = True
    memory_reserve: float = 0.1

    def __post_init__(self) -> None:
        for name in ("src_freeness", "dst_freeness"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.memory_reserve, (int, float)) or not 0 <= self.memory_reserve < 1:
            raise ValueError(f"memory_reserve must be in [0, 1), got {self.memory_reserve!r}")
        if not self.dst_freeness >= self.src_freeness:
            raise ValueError(f"the destination freeness threshold ({self.dst_freeness!r}) must be at least the "
                             f"source threshold ({self.src_freeness!r})")
        if not isinstance(self.max_per_instance, int) or self.max_per_instance < 1:
            raise ValueError(f"max migrations per instance must be a positive integer, got {self.max_per_instance!r}")
        MIGRATION_SELECTION.get(self.selection)


class MigrationPair(NamedTuple):
    """Move one request from instance `src` to `dst` (indices); `waiting_only`: a queued request."""

    src: int
    dst: int
    waiting_only: bool = False


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    """One instance as pairing sees it: its report (the dispatcher's view), whether it is draining,
    and how many migrations it has in flight."""

    report: LoadReport
    is_draining: bool
    num_migrations: int


PairingPolicy = Callable[[Sequence[InstanceLoad], MigrationPolicyConfig, LoadConfig], list[MigrationPair]]
SelectionPolicy = Callable[[Sequence[MigrationCandidate], bool], MigrationCandidate | None]

MIGRATION: Registry[PairingPolicy] = Registry("migration policy")
MIGRATION_SELECTION: Registry[SelectionPolicy] = Registry("migration selection")


@MIGRATION.register("none")
def no_migration(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig, load: LoadConfig) -> list[MigrationPair]:
    """Never migrate."""
    return []


@MIGRATION.register("llumnix")
def llumnix_pairing(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig,
                    load: LoadConfig) -> list[MigrationPair]:
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
    return [MigrationPair(src, dst) for src, dst in zip(sources, dests)]


@MIGRATION.register("shunter")
def shunter_pairing(loads: Sequence[InstanceLoad], cfg: MigrationPolicyConfig,
                    load: LoadConfig) -> list[MigrationPair]:
    """Shunter's: Llumnix's pairing for running requests (relieve instances running out of blocks),
    plus re-dispatch of queued work: an instance whose head-of-line request cannot start sends it
    to an instance with no queue that has the blocks to start it now (keeping `memory_reserve` of
    its capacity free for growth). A queued request holds no KV, so the move is instant; no request
    waits for memory on one instance while another could run it.
    """
    pairs = llumnix_pairing(loads, dataclasses.replace(cfg, move_waiting=False), load)
    busy = {i for p in pairs for i in (p.src, p.dst)}
    queued = [i for i, x in enumerate(loads) if i not in busy and x.report.num_waiting > 0
              and x.report.head_block_demand > x.report.num_free_blocks]
    hosts = [i for i, x in enumerate(loads) if i not in busy and not x.is_draining and x.report.num_waiting == 0]
    queued.sort(key=lambda i: (-loads[i].report.waiting_block_demand, i))
    hosts.sort(key=lambda i: (-loads[i].report.num_free_blocks, i))
    for src in queued:
        need = loads[src].report.head_block_demand
        for k, dst in enumerate(hosts):
            r = loads[dst].report
            if r.num_free_blocks - need >= cfg.memory_reserve * r.num_total_blocks:
                pairs.append(MigrationPair(src, dst, waiting_only=True))
                del hosts[k]
                break
    return pairs


def _has_movable(x: InstanceLoad) -> bool:
    r = x.report
    return r.num_running - r.num_migrating > 0 or r.num_waiting > 0


def head_of_line(candidates: Sequence[MigrationCandidate]) -> MigrationCandidate | None:
    """The first queued normal-priority request (queued pairs of the `shunter` policy)."""
    return next((c for c in candidates if c.is_waiting and c.priority <= NORMAL_PRIORITY), None)


def _select(candidates, move_waiting, key) -> MigrationCandidate | None:
    if move_waiting:  # no KV to copy: the cheapest move, and it cuts queueing at once (the head of line first)
        head = head_of_line(candidates)
        if head is not None:
            return head
    return min((c for c in candidates if not c.is_waiting and c.priority <= NORMAL_PRIORITY), key=key, default=None)


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
