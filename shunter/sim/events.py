"""Simulator events and the queue that orders them.

Each event is a small object with a time and a kind; the queue orders them by
the explicit key (time, kind priority, sequence number). Sequence numbers come
from an injected counter, so two runs push and pop in the same order.

Kind priorities at equal times: a step that ends at t is applied before
anything else happens at t; cluster events (P/D hand-offs, migration stages,
instances coming up, arrivals, control ticks, scaling) come next; a step that
starts at t starts last, so it sees every request that arrived at t.

Instance-local events (`StepStart`, `StepEnd`) exist only on the step-by-step
path (`SimConfig.fast_path=False`), and on the fast path for P/D's prefill
instances, whose step ends can be hand-offs. On the fast path the other
instances are advanced lazily to each cluster event's time instead (see
`simulator.py`); the result is the same, which tests/sim/test_fast_path.py checks.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from shunter.engine import ExecOutput, SchedulerOutput
    from shunter.cluster.global_scheduler import MigrationOrder
    from shunter.cluster.migration import Migration
    from shunter.sim.simulator import SimInstance


class Event:
    """Base: `kind` orders events of equal time (lower first); `is_cluster` events may observe every instance."""

    __slots__ = ("time",)
    kind = 0
    is_cluster = True

    def __init__(self, time: float) -> None:
        self.time = time

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "time")
        return f"{type(self).__name__}(t={self.time:.6f}{', ' + fields if fields else ''})"


class StepEnd(Event):
    """An instance's step finishes: apply the executed batch."""

    __slots__ = ("instance", "batch", "result")
    kind = 0
    is_cluster = False

    def __init__(self, time: float, instance: SimInstance, batch: SchedulerOutput, result: ExecOutput) -> None:
        super().__init__(time)
        self.instance = instance
        self.batch = batch
        self.result = result


class MigrationStage(Event):
    """A migration's next stage begins (the first stage, a copy stage, or the final one)."""

    __slots__ = ("migration",)
    kind = 1

    def __init__(self, time: float, migration: Migration) -> None:
        super().__init__(time)
        self.migration = migration


class MigrationOrderEvent(Event):
    """A migration ordered ahead of time (`Simulator.schedule_migration`) starts."""

    __slots__ = ("order",)
    kind = 1

    def __init__(self, time: float, order: MigrationOrder) -> None:
        super().__init__(time)
        self.order = order


class HandOff(Event):
    """P/D: a request got its first token on a prefill instance at the end of a step; it moves to a decode instance.

    A cluster event at that step's end, so every instance is brought to that time first.
    """

    __slots__ = ("instance", "request_id")
    kind = 1

    def __init__(self, time: float, instance: SimInstance, request_id: str) -> None:
        super().__init__(time)
        self.instance = instance
        self.request_id = request_id


class MigrationCommit(Event):
    """The final copy of a migration is done: the destination takes the request over."""

    __slots__ = ("migration",)
    kind = 2

    def __init__(self, time: float, migration: Migration) -> None:
        super().__init__(time)
        self.migration = migration


class InstanceReady(Event):
    """An instance started by the autoscaler is up: it joins dispatch.

    Before arrivals at the same time, so a request arriving then can go to it.
    """

    __slots__ = ("instance",)
    kind = 2

    def __init__(self, time: float, instance: SimInstance) -> None:
        super().__init__(time)
        self.instance = instance


class Arrival(Event):
    """The workload's request number `index` arrives and is dispatched."""

    __slots__ = ("index",)
    kind = 3

    def __init__(self, time: float, index: int) -> None:
        super().__init__(time)
        self.index = index


class ControlTick(Event):
    """The global scheduler's control loop runs: load reports, migration decisions."""

    __slots__ = ()
    kind = 4


class ScalingDecision(Event):
    """The autoscaler decides: add instances (each joins at its `InstanceReady`), drain one, or nothing."""

    __slots__ = ()
    kind = 5


class StepStart(Event):
    """An instance begins its next step (schedule + execute)."""

    __slots__ = ("instance",)
    kind = 9
    is_cluster = False

    def __init__(self, time: float, instance: SimInstance) -> None:
        super().__init__(time)
        self.instance = instance


class EventQueue:
    """A heap of events keyed by (time, kind, sequence number)."""

    def __init__(self, counter: Iterator[int] | None = None) -> None:
        self._heap: list[tuple[float, int, int, Any]] = []
        self._counter = counter if counter is not None else itertools.count()

    def push(self, event: Event) -> None:
        heapq.heappush(self._heap, (event.time, event.kind, next(self._counter), event))

    def pop(self) -> Event:
        return heapq.heappop(self._heap)[3]

    def peek_time(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
