"""The global scheduler: applies the registered cluster policies to the instances' load reports.

Torch-free, clock-free, no I/O: the simulator and the server both call it with
`now`. It never asks an instance for its load per request. Instances report at
the control interval (`update_reports`); between reports, the dispatcher adds
what it dispatched itself to the last report of each instance, as a real
cluster must. Each control tick (`control_step`) pairs instances for migration
and returns the orders for the driver to start through the migration
coordinator. Each scaling decision (`scaling_step`) reads the same view and
returns the instances to add or the one to drain, for the driver to carry out.

An instance may be admitted as *fixed* (`add_instance(..., movable=False)`):
dispatch treats it like any other, but a request on it can never move, and
no request moves onto it: it is never a migration source or destination,
nor where a request resumes (`select_instance(..., for_move=True)`). The
scheduler does not know why (a remote server exposes no KV blocks and no
request state); it only keeps the set.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.dispatch import DISPATCH, DispatchContext
from shunter.cluster.instance import Instance
from shunter.cluster.migration_policy import MIGRATION, MIGRATION_SELECTION, InstanceLoad, head_of_line
from shunter.cluster.scaling import SCALING, ClusterView, ScalingAction, ScalingState
from shunter.engine import LoadReport
from shunter.engine.block_manager import cdiv
from shunter.request import Request


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    """Move `request_id` from instance `src_id` to `dst_id` (started by the driver)."""

    request_id: str
    src_id: str
    dst_id: str


class GlobalScheduler:
    """Dispatches new requests and orders migrations with the policies of a `PolicyConfig`."""

    def __init__(self, instances: Sequence[Instance] = (), policy: PolicyConfig | None = None, seed: int = 0,
                 prefill_seconds: Callable[[int], float] | None = None) -> None:
        self.policy = policy or PolicyConfig()
        self.dispatch_policy = DISPATCH.get(self.policy.dispatch)
        self.pairing_policy = MIGRATION.get(self.policy.migration)
        self.selection_policy = MIGRATION_SELECTION.get(self.policy.migration_policy.selection)
        self.scaling_policy = SCALING.get(self.policy.scaling.policy) if self.policy.scaling is not None else None
        self.scaling_state = ScalingState()
        self.ctx = DispatchContext(rng=random.Random(seed), load=self.policy.load, prefill_seconds=prefill_seconds)
        self.instances: list[Instance] = []
        self.draining: set[str] = set()
        self.fixed: set[str] = set()  # requests never move to or from these (see the module's docstring)
        # The dispatcher's view: each instance's last report plus what was dispatched to it since.
        self.views: dict[str, LoadReport] = {}
        self.num_dispatches = 0
        for instance in instances:
            self.add_instance(instance)

    # ---- membership (scaling adds and drains instances through these) -----------
    def add_instance(self, instance: Instance, report: LoadReport | None = None, movable: bool = True) -> None:
        """Admit an instance to dispatch; `report` (or one taken at time 0) seeds the dispatcher's view.
        `movable=False`: requests never migrate to or from it, nor resume on it."""
        if any(i.instance_id == instance.instance_id for i in self.instances):
            raise ValueError(f"instance id {instance.instance_id!r} is already in use")
        self.instances.append(instance)
        if not movable:
            self.fixed.add(instance.instance_id)
        self.views[instance.instance_id] = report if report is not None else instance.load_report(0.0)

    def remove_instance(self, instance_id: str) -> Instance:
        instance = self.get_instance(instance_id)
        self.instances.remove(instance)
        self.views.pop(instance_id, None)
        self.draining.discard(instance_id)
        self.fixed.discard(instance_id)
        if self.ctx.prefix is not None:
            self.ctx.prefix.forget(instance_id)
        return instance

    def get_instance(self, instance_id: str) -> Instance:
        for instance in self.instances:
            if instance.instance_id == instance_id:
                return instance
        raise ValueError(f"no instance {instance_id!r}; instances: {', '.join(i.instance_id for i in self.instances)}")

    def drain(self, instance_id: str) -> None:
        """Take no new work on this instance; migration moves its requests away."""
        self.get_instance(instance_id)
        self.draining.add(instance_id)

    # ---- load reports ------------------------------------------------------------------
    def update_reports(self, reports: Sequence[LoadReport]) -> None:
        """Fresh reports replace the dispatcher's view of those instances."""
        for report in reports:
            if report.instance_id in self.views:
                self.views[report.instance_id] = report

    def collect_reports(self, now: float) -> list[LoadReport]:
        """Ask every instance for its report (in-process drivers' control tick) and take them in."""
        reports = [instance.load_report(now) for instance in self.instances]
        self.update_reports(reports)
        return reports

    @property
    def taking_work(self) -> list[Instance]:
        """The instances dispatch may pick (not draining), in order."""
        return [i for i in self.instances if i.instance_id not in self.draining]

    # ---- dispatch --------------------------------------------------------------------
    def select_instance(self, request: Request, now: float, for_move: bool = False) -> Instance:
        """The instance the dispatch policy picks for `request` from the current view; with `for_move`,
        among those a running request may move to (a request resumed after its instance failed)."""
        candidates = [i for i in self.taking_work if not (for_move and i.instance_id in self.fixed)]
        if not candidates:
            raise ValueError("no instance to dispatch to" if not self.instances else
                             "every instance is draining" if not self.taking_work else
                             "no instance a request can move to takes work")
        if len(candidates) == 1:
            return candidates[0]
        reports = [self.views[i.instance_id] for i in candidates]
        return candidates[self.dispatch_policy(reports, request, self.ctx)]

    def dispatch(self, request: Request, now: float) -> Instance:
        """Pick an instance and queue the request there; returns the instance."""
        instance = self.select_instance(request, now)
        self.assign(request, instance)
        return instance

    def assign(self, request: Request, instance: Instance) -> None:
        """Queue `request` on `instance` (chosen by `select_instance`); ValueError if it can never run there.

        Counts the request in the dispatcher's view of the instance until its next report.
        """
        instance.add_request(request)
        self.ctx.num_dispatched += 1
        self.num_dispatches += 1
        self.count_incoming(request, instance.instance_id)

    def count_incoming(self, request: Request, instance_id: str) -> None:
        """Add `request` to the view of `instance_id` as queued there (a dispatch, or a migration on its way)."""
        view = self.views[instance_id]
        blocks = cdiv(request.num_tokens, view.block_size)
        self.views[instance_id] = dataclasses.replace(
            view,
            num_waiting=view.num_waiting + 1,
            head_block_demand=view.head_block_demand if view.num_waiting else blocks,
            waiting_block_demand=view.waiting_block_demand + blocks,
            num_pending_prefill_tokens=view.num_pending_prefill_tokens + request.num_tokens,
        )

    def count_prefilled(self, request: Request, instance_id: str) -> None:
        """`request`'s prompt is prefilled on `instance_id` (its first token came back): no longer queued
        prefill in the view (until the instance's next report, which says so itself)."""
        view = self.views.get(instance_id)
        if view is not None:
            self.views[instance_id] = dataclasses.replace(
                view, num_pending_prefill_tokens=max(0, view.num_pending_prefill_tokens - request.num_tokens))

    # ---- control loop ---------------------------------------------------------------
    def migration_orders(self, now: float, num_migrations: Callable[[str], int] = lambda _: 0) -> list[MigrationOrder]:
        """Every migration to start at this control tick: the policy's (`control_step`) and a drain's (`drain_step`).

        What both drivers call each tick, so a drained instance empties the same way in both.
        """
        return self.control_step(now, num_migrations) + self.drain_step(now, num_migrations)

    def control_step(self, now: float, num_migrations: Callable[[str], int] = lambda _: 0) -> list[MigrationOrder]:
        """One control tick over the current view: the migrations to start.

        `num_migrations(instance_id)` is how many it has in flight (the
        coordinator's count). Each paired source picks its request with the
        selection policy; high-priority requests never move away.
        """
        if len(self.movable) < 2 or self.policy.migration == "none":
            return []
        return self._orders(self.pairing_policy, num_migrations, only_draining=False)

    def drain_step(self, now: float, num_migrations: Callable[[str], int] = lambda _: 0) -> list[MigrationOrder]:
        """Orders that move requests off draining instances when no migration policy runs.

        With a migration policy, `control_step` already empties draining
        instances (they are its first sources). Without one (`none`), a drain
        still moves every request away: Llumnix's pairing, draining sources only.
        """
        if len(self.movable) < 2 or not self.draining or self.policy.migration != "none":
            return []
        return self._orders(MIGRATION.get("llumnix"), num_migrations, only_draining=True)

    @property
    def movable(self) -> list[Instance]:
        """The instances requests may migrate between (not fixed), in order."""
        return [i for i in self.instances if i.instance_id not in self.fixed]

    def _orders(self, pairing, num_migrations: Callable[[str], int], only_draining: bool) -> list[MigrationOrder]:
        # Fixed instances are left out before pairing: a policy never sees them, so it cannot pair one.
        instances = self.movable
        loads = [InstanceLoad(self.views[i.instance_id], i.instance_id in self.draining, num_migrations(i.instance_id))
                 for i in instances]
        cfg = self.policy.migration_policy
        orders = []
        for pair in pairing(loads, cfg, self.policy.load):
            if only_draining and not loads[pair.src].is_draining:
                continue
            source = instances[pair.src]
            candidates = source.migration_candidates()
            if pair.waiting_only:
                choice = head_of_line(candidates)
            else:
                # A draining instance sends its queue away too, whatever the policy says about waiting requests.
                choice = self.selection_policy(candidates, cfg.move_waiting or loads[pair.src].is_draining)
            if choice is not None:
                orders.append(MigrationOrder(choice.request_id, source.instance_id, instances[pair.dst].instance_id))
        return orders

    def scaling_step(self, now: float, num_starting: int = 0) -> ScalingAction:
        """One autoscaling decision over the current view (`views`, `draining`): what to add or drain.

        `num_starting` is how many instances the driver has started that are
        not up yet (not added here). The driver carries the action out: it
        starts `num_add` instances and `add_instance`s each once it is up,
        and `drain`s `drain_id`, then `remove_instance`s it once it holds no
        request and no migration. No scaling configured: always a no-op.
        """
        if self.scaling_policy is None:
            return ScalingAction()
        view = ClusterView([self.views[i.instance_id] for i in self.instances],
                           [i.instance_id in self.draining for i in self.instances], num_starting, now)
        return self.scaling_policy(view, self.policy.scaling, self.policy.load, self.scaling_state)
