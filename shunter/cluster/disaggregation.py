"""Prefill/decode disaggregation: one rule, applied by the simulator and by the server.

P/D is migration at a fixed point (DESIGN §4). `PDSplit(P, D)` gives P prefill
and D decode instances, each role in a global scheduler of its own
(`Disaggregation.prefill`, `.decode`), both with the same policies:

1. A new request is dispatched by the prefill scheduler, so it prefills on a
   prefill instance.
2. After its first token, the driver calls `Disaggregation.hand_off`: the decode
   scheduler's dispatch policy picks a decode instance and the driver migrates
   the request there with its KV through THE migration state machine
   (`cluster/migration.py`); the decode scheduler counts it as incoming until
   that instance's next report. As with any live migration, the request keeps
   decoding on the prefill instance while its blocks copy, until the final stage
   suspends it (with `MigrationConfig.max_stages=1`, a stop-and-copy, it makes
   no step there after its first token).
3. If no decode instance takes work (none, or all draining) or the order is
   refused, the request decodes where it prefilled; a migration that aborts
   leaves it there too. There is one hand-off per request, never a retry.
4. Migration policies and drains balance within a role (each scheduler's
   `control_step` and `drain_step`); requests cross from prefill to decode only
   by hand-off.

Autoscaling is not role-aware (the scaling policy reads one scheduler and adds
mixed instances), so a `Disaggregation` refuses a policy with scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shunter.cluster.bundles import PolicyConfig
from shunter.cluster.global_scheduler import GlobalScheduler
from shunter.cluster.instance import Instance
from shunter.cluster.migration import MigrationRefused
from shunter.errors import CLIError
from shunter.request import Request

MIXED, PREFILL, DECODE = "mixed", "prefill", "decode"


@dataclass(frozen=True, slots=True)
class PDSplit:
    """How many prefill and decode instances a P/D cluster has (at least one of each)."""

    num_prefill: int
    num_decode: int

    def __post_init__(self) -> None:
        for role, n in ((PREFILL, self.num_prefill), (DECODE, self.num_decode)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"P/D needs at least one {role} instance, got {n!r}")

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode

    def roles(self) -> list[str]:
        """The instances' roles in id order: the prefill instances first."""
        return [PREFILL] * self.num_prefill + [DECODE] * self.num_decode

    def __str__(self) -> str:
        return f"{self.num_prefill}:{self.num_decode}"


def parse_pd(text: str | None, *, instances: int | None = None, autoscale: str | None = None) -> PDSplit | None:
    """The `PDSplit` of `--pd P:D` (None without it), for `shunter serve` and `shunter simulate` alike.

    `instances` and `autoscale` are the values of `--instances` and `--autoscale` (None: not given).
    CLIError naming the value if it is not P:D with P, D >= 1, or naming both flags if it comes with
    `--autoscale` (autoscaling is not P/D-aware) or with an `--instances` other than P + D.
    """
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise CLIError(f"--pd must be P:D with P, D >= 1 (e.g. 1:1), got {text!r}")
    split = PDSplit(int(parts[0]), int(parts[1]))
    if autoscale is not None:
        raise CLIError(f"--autoscale {autoscale} with --pd {text}: autoscaling is not P/D-aware (it would read "
                       f"the prefill instances only and add mixed ones); use one or the other")
    if instances is not None and instances != split.num_instances:
        raise CLIError(f"--instances {instances} with --pd {text}: P/D runs P + D = {split.num_instances} "
                       f"instances; leave --instances out")
    return split


@dataclass(frozen=True, slots=True)
class HandOff:
    """What `Disaggregation.hand_off` did: the decode instance the request is migrating to, or why it stays.

    Both None: the request is not on a prefill instance, so nothing was to be done.
    """

    dst: Instance | None = None
    problem: str | None = None


class Disaggregation:
    """The prefill and decode global schedulers of a P/D cluster, and the hand-off between them."""

    def __init__(self, split: PDSplit | tuple[int, int], policy: PolicyConfig, seed: int = 0,
                 prefill_seconds: Callable[[int], float] | None = None) -> None:
        if policy.scaling is not None:
            raise ValueError("autoscaling is not P/D-aware (it reads the prefill instances only and adds mixed "
                             "ones): use a fixed P:D split")
        self.split = split if isinstance(split, PDSplit) else PDSplit(*split)
        self.prefill = GlobalScheduler(policy=policy, seed=seed, prefill_seconds=prefill_seconds)
        self.decode = GlobalScheduler(policy=policy, seed=seed + 1, prefill_seconds=prefill_seconds)

    @property
    def schedulers(self) -> tuple[GlobalScheduler, GlobalScheduler]:
        """Both schedulers, prefill first (the order control ticks run them in)."""
        return self.prefill, self.decode

    def scheduler_for(self, role: str) -> GlobalScheduler:
        """The scheduler an instance of `role` belongs to."""
        if role not in (PREFILL, DECODE):
            raise ValueError(f"a P/D instance is {PREFILL} or {DECODE}, got {role!r}")
        return self.decode if role == DECODE else self.prefill

    def hand_off(self, request: Request, src_id: str, now: float, migrate: Callable[[Instance], object]) -> HandOff:
        """Call once, when `request` has its first token on instance `src_id`: move it to a decode instance.

        `migrate(dst)` starts the driver's migration of the request from `src_id` to `dst` (raising
        MigrationRefused if it cannot start). Nothing happens unless `src_id` is a prefill instance.
        """
        if src_id not in self.prefill.views:
            return HandOff()
        try:
            dst = self.decode.select_instance(request, now)
        except ValueError as exc:
            return HandOff(problem=f"no decode instance takes it ({exc}): it decodes on prefill instance {src_id}")
        try:
            migrate(dst)
        except MigrationRefused as exc:
            return HandOff(problem=f"the hand-off to decode instance {dst.instance_id} was refused: {exc}")
        self.decode.count_incoming(request, dst.instance_id)
        return HandOff(dst=dst)
