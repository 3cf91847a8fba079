"""Cluster policies, registered by name: dispatch now; migration pairing, priorities and scaling next.

A dispatch policy is one function `(reports, request, ctx) -> index` that picks
the instance for a new request from the latest `LoadReport`s (one per live
instance, in the global scheduler's instance order). It must be deterministic
given its arguments (ties broken by index) so that simulations repeat exactly;
randomness, where a policy wants it, comes from `ctx.rng`, which is seeded.

Adding a policy is one function plus its `@DISPATCH.register(...)` line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shunter.cluster.load import LoadReport
from shunter.registry import Registry
from shunter.request import Request


@dataclass
class DispatchContext:
    """State a dispatch policy may keep across calls, owned by the global scheduler.

    num_dispatched: requests dispatched so far (round-robin's cursor).
    rng: seeded random source for policies that want one.
    """

    num_dispatched: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))


DispatchPolicy = Callable[[Sequence[LoadReport], Request, DispatchContext], int]

DISPATCH: Registry[DispatchPolicy] = Registry("dispatch policy")


@DISPATCH.register("round-robin")
def round_robin(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Instances in turn, blind to load."""
    return ctx.num_dispatched % len(reports)


@DISPATCH.register("least-load")
def least_load(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """The instance with the smallest KV demand as a fraction of its capacity.

    demand = used blocks + the blocks every waiting request needs for its tokens
    so far (`waiting_block_demands`, which counts preempted requests too), over
    the instance's total blocks. Queued work counts as if it were already
    admitted, so a burst spreads out instead of piling onto the instance that
    merely has free blocks right now. Ties go to the lowest index.
    """
    best, best_load = 0, float("inf")
    for i, r in enumerate(reports):
        load = (r.num_used_blocks + sum(r.waiting_block_demands)) / r.num_total_blocks
        if load < best_load:
            best, best_load = i, load
    return best
