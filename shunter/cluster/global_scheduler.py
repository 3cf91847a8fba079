"""The global scheduler: a thin layer that applies registered cluster policies to load reports.

Torch-free, clock-free, no I/O: the real server and the simulator both call it
with `now`. Today it dispatches; its control step (called every control-loop
tick) is where migration pairing and autoscaling plug in, each as a registered
policy, and returns the actions for the driver to carry out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from shunter.cluster.instance import Instance
from shunter.cluster.load import LoadReport
from shunter.cluster.policies import DISPATCH, DispatchContext
from shunter.request import Request


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    """Move `request_id` from instance `src_id` to `dst_id` (carried out by the driver)."""

    request_id: str
    src_id: str
    dst_id: str


class GlobalScheduler:
    """Picks an instance for every new request with the dispatch policy named `dispatch`."""

    def __init__(self, instances: Sequence[Instance] = (), dispatch: str = "least-load", seed: int = 0) -> None:
        self.dispatch_name = dispatch
        self.dispatch_policy = DISPATCH.get(dispatch)
        self.ctx = DispatchContext(rng=random.Random(seed))
        self.instances: list[Instance] = []
        for instance in instances:
            self.add_instance(instance)

    # ---- membership (scaling adds and drains instances through these) -----------
    def add_instance(self, instance: Instance) -> None:
        if any(i.instance_id == instance.instance_id for i in self.instances):
            raise ValueError(f"instance id {instance.instance_id!r} is already in use")
        self.instances.append(instance)

    def remove_instance(self, instance_id: str) -> Instance:
        for k, instance in enumerate(self.instances):
            if instance.instance_id == instance_id:
                return self.instances.pop(k)
        raise ValueError(f"no instance {instance_id!r}")

    def get_instance(self, instance_id: str) -> Instance:
        for instance in self.instances:
            if instance.instance_id == instance_id:
                return instance
        raise ValueError(f"no instance {instance_id!r}")

    # ---- dispatch --------------------------------------------------------------------
    def load_reports(self, now: float) -> list[LoadReport]:
        return [instance.load_report(now) for instance in self.instances]

    def select_instance(self, request: Request, now: float) -> Instance:
        """The instance the dispatch policy picks for `request` from reports as of `now`."""
        if not self.instances:
            raise ValueError("no instance to dispatch to")
        if len(self.instances) == 1:
            index = 0
        else:
            index = self.dispatch_policy(self.load_reports(now), request, self.ctx)
        return self.instances[index]

    def dispatch(self, request: Request, now: float) -> Instance:
        """Pick an instance and queue the request there; returns the instance."""
        instance = self.select_instance(request, now)
        self.assign(request, instance)
        return instance

    def assign(self, request: Request, instance: Instance) -> None:
        """Queue `request` on `instance` (chosen by `select_instance`); ValueError if it can never run there."""
        instance.add_request(request)
        self.ctx.num_dispatched += 1

    # ---- control loop ---------------------------------------------------------------
    def control_step(self, reports: Sequence[LoadReport], now: float) -> list[MigrationOrder]:
        """Called every control-loop tick with fresh reports; returns migrations to start.

        No migration policy exists yet, so this returns nothing; a pairing
        policy (Llumnix: least free sources to freest destinations) goes here.
        """
        return []

    def scaling_decision(self, reports: Sequence[LoadReport], now: float) -> int:
        """Instances to add (> 0) or drain (< 0); autoscaling is not written yet, so 0."""
        return 0
