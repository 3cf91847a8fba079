"""When a drained instance stops: one rule, applied by the simulator and by the server.

Draining an instance (the scaling policy's `drain_id`, or `/admin/instances/{id}/drain`)
takes it out of dispatch (`GlobalScheduler.drain`); the migration policy, or
`GlobalScheduler.drain_step` when none runs, moves its requests away. The instance may
stop (leave the global scheduler, be shut down, stop costing) only once nothing can
still need it:

- it holds no request: none running, waiting, or suspended for a migration's final
  copy. The driver asks both what it tracks (the server's owner map) and the engine
  itself (a request whose commit or finish has not reached the driver yet is still
  the instance's);
- no migration has it as source or destination: an abort hands the request back to
  the source, a commit needs the destination;
- no step of it is under way: a step's tokens, and the finishes among them, are
  applied at its end.

The driver says what it sees; `stop_if_drained` decides and takes the instance out of
its global scheduler. Stopping the instance itself (its process, its cost) stays with
the driver.
"""

from __future__ import annotations

from shunter.cluster.global_scheduler import GlobalScheduler


def stop_if_drained(scheduler: GlobalScheduler, instance_id: str, *, has_requests: bool, num_migrations: int,
                    is_stepping: bool = False) -> bool:
    """Remove `instance_id` from `scheduler` if it is draining there and may stop now; True if it was removed.

    has_requests: the instance holds a request (running, waiting or suspended), by the driver's
        account or the engine's (serving reads the engine's from its last load report).
    num_migrations: migrations in flight with the instance as source or destination.
    is_stepping: a step of it is under way (the simulator's bookkeeping; a serving instance
        reports a step's requests as running until the step ends, so `has_requests` covers it).

    False, and nothing changes, for an instance that is not draining in `scheduler` (never drained,
    or already removed) or that is still needed.
    """
    if instance_id not in scheduler.draining or has_requests or num_migrations or is_stepping:
        return False
    scheduler.remove_instance(instance_id)
    return True
