"""Replay a timed workload on a cluster of real instances through the serving frontend (no HTTP).

`shunter bench fidelity --instances N` runs its workload here and in the
simulator with the same dispatch and migration policies. The real side is the
serving runtime itself: a `Frontend` with N Ray-actor instances of the built-in
model (each its own process and torch threads), its global scheduler
dispatching on the pushed load reports and its control loop ordering live
migrations, which the migration driver carries out with KV copies between the
actors. Requests are submitted as token ids at their arrival times, greedy with
`ignore_eos`, so each generates exactly its `max_tokens` tokens, as in the
simulator. A token's time is the instance's stamp at the end of the step that
produced it, and a request's arrival is its scheduled time: queueing in the
frontend and behind a busy step counts, as it does in the simulator.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from shunter.bench.replay import TimedRequest
from shunter.request import SamplingParams
from shunter.sim.metrics import RequestRecord


@dataclass
class ClusterReplayResult:
    """Per request its latencies (seconds from the replay's start); the migrations the cluster made."""

    records: list[RequestRecord]
    migrations: list = field(default_factory=list)  # shunter.cluster.migration.Migration, every outcome
    wall_seconds: float = 0.0
    dispatches: dict[str, int] = field(default_factory=dict)  # instance id -> requests dispatched there
    steps: list = field(default_factory=list)  # the instances' steps (ProfileStep), when they recorded them
    steps_by_instance: dict[str, list] = field(default_factory=dict)  # the same, per instance id

    @property
    def num_committed(self) -> int:
        return sum(1 for m in self.migrations if m.outcome == "committed")


async def replay_cluster(frontend, requests: Sequence[TimedRequest],
                         on_finish: Callable[[int], None] | None = None) -> ClusterReplayResult:
    """Submit `requests` to a started `frontend` at their arrival times and wait for all of them."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    if len({r.request_id for r in pending}) != len(pending):
        raise ValueError("request ids must be unique")
    start = time.monotonic()
    dispatches: dict[str, int] = {}
    tasks = []
    for tr in pending:
        delay = start + tr.arrival_time - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        stream = frontend.submit(list(tr.prompt_token_ids),
                                 SamplingParams(temperature=0.0, max_tokens=tr.max_tokens, ignore_eos=True))
        dispatches[stream.instance_id] = dispatches.get(stream.instance_id, 0) + 1
        tasks.append(asyncio.create_task(_follow(frontend, stream, tr, start, on_finish)))
    records = await asyncio.gather(*tasks)
    history = list(frontend.migrations.history) if frontend.migrations is not None else []
    records.sort(key=lambda r: (r.arrival_time, r.request_id))
    return ClusterReplayResult(records, history, time.monotonic() - start, dispatches)


async def _follow(frontend, stream, tr: TimedRequest, start: float, on_finish) -> RequestRecord:
    first = last = None
    num_tokens = 0
    while True:
        # The stream's own events, one per delivery (`Frontend.events` merges a backlog, which would
        # move a first token's stamp to the end of the merged batch).
        event = await stream.queue.get()
        if event.token_ids:
            first = event.time if first is None else first
            last = event.time
            num_tokens += len(event.token_ids)
        if event.finish_reason is not None:
            if event.finish_reason != "length":
                raise RuntimeError(f"request {tr.request_id} ended with {event.finish_reason!r}: {event.error}")
            break
    if on_finish is not None:
        on_finish(1)
    return RequestRecord(request_id=tr.request_id, instance_id=stream.instance_id, arrival_time=tr.arrival_time,
                         first_token_time=first - start, finish_time=last - start,
                         num_prompt_tokens=len(tr.prompt_token_ids), num_output_tokens=num_tokens)
