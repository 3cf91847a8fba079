"""Hand-built load reports for policy tests (no engine needed)."""

from __future__ import annotations

from shunter.engine import LoadReport


def report(iid: str = "0", used: int = 0, total: int = 100, running: int = 0, waiting: int = 0,
           head: int = 0, waiting_demand: int | None = None, pending: int = 0, priorities: dict | None = None,
           preempted: int = 0, migrating: int = 0) -> LoadReport:
    return LoadReport(iid, 0.0, num_running=running, num_waiting=waiting, num_preempted=preempted,
                      num_used_blocks=used, num_free_blocks=total - used, num_total_blocks=total,
                      head_block_demand=head, waiting_block_demand=head if waiting_demand is None else waiting_demand,
                      num_pending_prefill_tokens=pending, priority_to_num_running=priorities or {},
                      num_migrating=migrating)
