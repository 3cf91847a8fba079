"""Policy bundles: dispatch + migration (+ their settings) under one name, for users who do not tune.

`--policy NAME` picks a bundle; individual flags (`--dispatch`, `--migration`, ...)
override its parts. Adding a bundle is one function plus its decorator line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from shunter.cluster.dispatch import DISPATCH
from shunter.cluster.load import LoadConfig
from shunter.cluster.migration_policy import MIGRATION, MigrationPolicyConfig
from shunter.cluster.scaling import ScalingConfig
from shunter.registry import Registry


@dataclass
class PolicyConfig:
    """Every cluster policy choice of one run (or one server).

    dispatch: dispatch policy name (`DISPATCH`).
    migration: migration pairing policy name (`MIGRATION`); "none" never migrates.
    migration_policy: its thresholds and request selection.
    load: how virtual usage counts priorities (freeness).
    scaling: autoscaling bounds and thresholds; None: a fixed number of instances.
    """

    dispatch: str = "infaas"
    migration: str = "none"
    migration_policy: MigrationPolicyConfig = field(default_factory=MigrationPolicyConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    scaling: ScalingConfig | None = None

    def __post_init__(self) -> None:
        self.dispatch = DISPATCH.canonical(self.dispatch)
        self.migration = MIGRATION.canonical(self.migration)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


BUNDLES: Registry[Callable[[], PolicyConfig]] = Registry("policy bundle")


@BUNDLES.register("rr")
def round_robin_bundle() -> PolicyConfig:
    """Round robin, no migration: the naive baseline."""
    return PolicyConfig(dispatch="round-robin", migration="none")


@BUNDLES.register("infaas")
def infaas_bundle() -> PolicyConfig:
    """INFaaS++ dispatch (least KV demand), no migration: the Llumnix paper's strong baseline."""
    return PolicyConfig(dispatch="infaas", migration="none")


@BUNDLES.register("llumnix")
def llumnix_bundle() -> PolicyConfig:
    """Llumnix as in the paper: freeness dispatch, migration of the shortest running request from
    the least free to the freest instances; only running requests move."""
    return PolicyConfig(dispatch="llumnix", migration="llumnix",
                        migration_policy=MigrationPolicyConfig(selection="shortest", move_waiting=False))


@BUNDLES.register("shunter")
def shunter_bundle() -> PolicyConfig:
    """Shunter's own: dispatch by predicted TTFT among instances with KV room to grow (`shunter`
    dispatch); Llumnix's migration to relieve instances running out of blocks, plus queued requests
    re-dispatched to instances that can start them at once (`shunter` migration)."""
    return PolicyConfig(dispatch="shunter", migration="shunter",
                        migration_policy=MigrationPolicyConfig(selection="shortest", move_waiting=False))


def build_policy(bundle: str | None = None, **overrides) -> PolicyConfig:
    """The bundle's PolicyConfig (default: `infaas`) with the non-None `overrides` applied.

    Overrides name PolicyConfig fields (`dispatch`, `migration`, `load`, `scaling`) or
    MigrationPolicyConfig fields (`src_freeness`, `selection`, ...).
    """
    config = BUNDLES.get(bundle or "infaas")()
    mig_fields = {f.name for f in dataclasses.fields(MigrationPolicyConfig)}
    mig = {k: v for k, v in overrides.items() if k in mig_fields and v is not None}
    top = {k: v for k, v in overrides.items() if k not in mig_fields and v is not None}
    unknown = set(top) - {f.name for f in dataclasses.fields(PolicyConfig)}
    if unknown:
        raise ValueError(f"unknown policy setting(s): {', '.join(sorted(unknown))}")
    if mig:
        top["migration_policy"] = dataclasses.replace(config.migration_policy, **mig)
    return dataclasses.replace(config, **top)
