"""Dispatch policies, registered by name: which instance a new request goes to.

A dispatch policy is one function `(reports, request, ctx) -> index` that
picks among the dispatchable instances (in the global scheduler's order) from
the dispatcher's view of their load: the latest `LoadReport` of each plus what
was dispatched to it since (`GlobalScheduler` keeps that view; no policy calls
an instance). It must be deterministic given its arguments, ties broken by the
lowest index, so simulations repeat exactly; randomness comes from `ctx.rng`,
which is seeded.

Adding a policy is one function plus its `@DISPATCH.register(...)` line.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shunter.cluster.load import LoadConfig, argmax, argmin, freeness, kv_demand_blocks
from shunter.engine import LoadReport
from shunter.registry import Registry
from shunter.request import Request


@dataclass
class DispatchContext:
    """What dispatch policies may read or keep across calls; owned by the global scheduler.

    num_dispatched: requests dispatched so far (round-robin's cursor).
    rng: seeded random source for policies that want one.
    load: how virtual usage counts priorities (freeness).
    prefill_seconds: predicted seconds to prefill n tokens on one instance
        (the `slo` policy; the simulator derives it from its latency model,
        serving from a profile). None: the `slo` policy ranks by tokens.
    prefix: the prefix index of the `prefix` policy.
    imbalance_threshold: the `prefix` policy ignores cache affinity when the
        most and least loaded instances differ by more than this (in
        requests running + waiting), as the SGLang router does.
    memory_reserve: the `shunter` policy keeps this fraction of an instance's
        KV capacity for the growth of its running requests.
    ttft_slack: seconds of predicted TTFT the `shunter` policy gives up for a smaller batch.
    """

    num_dispatched: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    load: LoadConfig = field(default_factory=LoadConfig)
    prefill_seconds: Callable[[int], float] | None = None
    prefix: PrefixIndex | None = None
    imbalance_threshold: int = 32
    memory_reserve: float = 0.2
    ttft_slack: float = 0.05


DispatchPolicy = Callable[[Sequence[LoadReport], Request, DispatchContext], int]

DISPATCH: Registry[DispatchPolicy] = Registry("dispatch policy")


def kv_demand(r: LoadReport) -> float:
    """Used blocks plus the blocks every waiting request needs, over capacity (INFaaS++'s load)."""
    return (r.num_used_blocks + r.waiting_block_demand) / r.num_total_blocks


@DISPATCH.register("round-robin")
def round_robin(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Instances in turn, blind to load."""
    return ctx.num_dispatched % len(reports)


DISPATCH.alias("rr", "round-robin")


@DISPATCH.register("random")
def random_choice(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """A uniformly random instance (seeded)."""
    return ctx.rng.randrange(len(reports))


@DISPATCH.register("least-requests")
def least_requests(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """The fewest requests running or waiting."""
    return argmin([r.num_running + r.num_waiting for r in reports])


@DISPATCH.register("queue")
def shortest_queue(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """The fewest waiting requests; among equals, the fewest running (so an idle cluster still spreads)."""
    return argmin([r.num_waiting * 1_000_000 + r.num_running for r in reports])


@DISPATCH.register("infaas")
def infaas(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """INFaaS++ (the Llumnix paper's strong baseline): the smallest KV demand over capacity,
    queued requests counted as if admitted, so a burst spreads out."""
    return argmin([kv_demand(r) for r in reports])


DISPATCH.alias("least-load", "infaas")


@DISPATCH.register("llumnix")
def llumnix(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """The freest instance (Llumnix Alg. 1: virtual usage with priority headroom)."""
    return argmax([freeness(r, ctx.load) for r in reports])


@DISPATCH.register("power-of-two")
def power_of_two(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Two distinct random instances; the one with the smaller KV demand."""
    if len(reports) == 1:
        return 0
    a, b = ctx.rng.sample(range(len(reports)), 2)
    da, db = kv_demand(reports[a]), kv_demand(reports[b])
    return a if (da, a) < (db, b) else b


@DISPATCH.register("prefix")
def prefix_aware(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Cache-aware: the least prefill ahead of this request's first token, counting what each instance
    was sent of its prompt (by stable block digests) as cached there: queued prefill tokens plus the
    prompt's tokens beyond its longest match; among equals, the least KV demand. Plain least-load when
    the cluster is imbalanced beyond `ctx.imbalance_threshold` requests.

    Ranking by the match alone (the longest match, load only among equals) sends a conversation's turn
    to its instance however much prefill is queued there, while an instance whose queue is empty sits
    idle; ranking by load alone sends requests that arrive together to the one instance that just
    emptied, to be prefilled together. Both cost time to first token on instances that prefill one
    prompt after another."""
    if ctx.prefix is None:
        ctx.prefix = PrefixIndex()
    index = ctx.prefix
    digests = index.digests(request)
    loads = [r.num_running + r.num_waiting for r in reports]
    demand = [kv_demand(r) for r in reports]
    if max(loads) - min(loads) > ctx.imbalance_threshold:
        choice = argmin(demand)
    else:
        uncached = [max(0, request.num_tokens - index.match_length(r.instance_id, digests) * index.block_tokens)
                    for r in reports]
        ahead = [r.num_pending_prefill_tokens + u for r, u in zip(reports, uncached)]
        choice = min(range(len(reports)), key=lambda i: (ahead[i], demand[i], i))
    index.record(reports[choice].instance_id, digests)
    return choice


@DISPATCH.register("slo")
def slo_aware(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Predicts this request's TTFT on each instance from the prefill work queued there (plus its
    own prompt) and picks the least loaded (KV demand) instance that meets its TTFT SLO; without an
    SLO, or when none meets it, the smallest predicted TTFT."""
    ttfts = [predicted_ttft(r, request.num_tokens, ctx) for r in reports]
    slo = request.ttft_slo
    if slo is not None:
        meeting = [kv_demand(r) if t <= slo else float("inf") for r, t in zip(reports, ttfts)]
        choice = argmin(meeting)
        if meeting[choice] != float("inf"):
            return choice
    return argmin(ttfts)


@DISPATCH.register("shunter")
def ttft_within_memory(reports: Sequence[LoadReport], request: Request, ctx: DispatchContext) -> int:
    """Shunter's: the smallest predicted TTFT among instances whose KV demand, this request included,
    leaves `ctx.memory_reserve` of their capacity free for the running requests to grow; when none
    does, the smallest KV demand (INFaaS++). Time-to-first-token is prefill queueing, which KV demand
    alone misses (a long prompt costs more prefill than its blocks suggest); memory-blind TTFT
    ranking alone piles decodes up until they preempt each other."""
    fits: list[int] = []
    ttfts: list[float] = []
    for i, r in enumerate(reports):
        blocks = request.num_tokens / r.block_size  # instances may differ in block size
        demand = (kv_demand_blocks(r, ctx.load) + blocks) / r.num_total_blocks
        if demand <= 1.0 - ctx.memory_reserve:
            fits.append(i)
            ttfts.append(predicted_ttft(r, request.num_tokens, ctx))
    if not fits:
        return infaas(reports, request, ctx)
    # Among instances within `ttft_slack` of the best TTFT, the smallest batch: decode steps slow down
    # with the batch, so this keeps the time per output token down at no cost in TTFT.
    limit = min(ttfts) + ctx.ttft_slack
    return min((reports[i].num_running, i) for i, t in zip(fits, ttfts) if t <= limit)[1]


def predicted_ttft(report: LoadReport, num_prompt_tokens: int, ctx: DispatchContext) -> float:
    """Seconds (tokens, without `ctx.prefill_seconds`) of prefill ahead of and including this prompt."""
    tokens = report.num_pending_prefill_tokens + num_prompt_tokens
    return ctx.prefill_seconds(tokens) if ctx.prefill_seconds is not None else float(tokens)


# ---- prefix affinity ------------------------------------------------------------------------
class PrefixIndex:
    """Which prompt prefixes the dispatcher sent where, by chained block digests.

    A digest is BLAKE2b over the previous digest and a block of `block_tokens`
    token ids: stable across processes and runs (unlike Python's `hash()`), so
    a global scheduler can compare prefixes across instances. Each instance
    remembers its most recent `capacity` digests (LRU), a stand-in for what
    its prefix cache still holds.
    """

    def __init__(self, block_tokens: int = 64, capacity: int = 65536) -> None:
        if block_tokens < 1 or capacity < 1:
            raise ValueError("block_tokens and capacity must be positive")
        self.block_tokens = block_tokens
        self.capacity = capacity
        self.instance_to_digests: dict[str, OrderedDict[bytes, None]] = {}

    def digests(self, request: Request) -> list[bytes]:
        """Chained digests of the request's full prompt blocks."""
        tokens = request.prompt_token_ids
        bt = self.block_tokens
        out: list[bytes] = []
        parent = b""
        for start in range(0, len(tokens) - bt + 1, bt):
            block = array("q", tokens[start:start + bt]).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=8).digest()
            out.append(parent)
        return out

    def match_length(self, instance_id: str, digests: Sequence[bytes]) -> int:
        """How many leading digests this instance was sent."""
        seen = self.instance_to_digests.get(instance_id)
        if not seen:
            return 0
        n = 0
        for d in digests:
            if d not in seen:
                break
            n += 1
        return n

    def record(self, instance_id: str, digests: Sequence[bytes]) -> None:
        seen = self.instance_to_digests.setdefault(instance_id, OrderedDict())
        for d in digests:
            seen[d] = None
            seen.move_to_end(d)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        """The instance left the cluster (or lost its cache)."""
        self.instance_to_digests.pop(instance_id, None)
