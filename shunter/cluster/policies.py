"""The catalog of cluster policies: every registry a user can pick from by name.

The policies themselves live one concern per module: `dispatch.py` (where a
new request goes), `migration_policy.py` (which instances pair up and which
request moves), `scaling.py` (when instances are added or drained),
`bundles.py` (named combinations).
"""

from __future__ import annotations

from shunter.cluster.bundles import BUNDLES, PolicyConfig, build_policy
from shunter.cluster.dispatch import DISPATCH, DispatchContext
from shunter.cluster.migration import LINKS
from shunter.cluster.migration_policy import MIGRATION, MIGRATION_SELECTION
from shunter.cluster.scaling import SCALING, ScalingConfig
from shunter.registry import Registry

__all__ = ["BUNDLES", "DISPATCH", "DispatchContext", "LINKS", "MIGRATION", "MIGRATION_SELECTION", "PolicyConfig",
           "SCALING", "ScalingConfig", "build_policy", "catalog"]


def catalog() -> dict[str, Registry]:
    """Every named choice, for `--list` listings and error messages."""
    return {"policy bundles": BUNDLES, "dispatch": DISPATCH, "migration": MIGRATION,
            "migration selection": MIGRATION_SELECTION, "scaling": SCALING, "links": LINKS}
