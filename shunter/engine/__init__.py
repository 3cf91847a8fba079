"""Per-instance, torch-free engine: block manager, scheduler, the step loop."""

from shunter.engine.block_manager import BlockManager
from shunter.engine.engine import InstanceEngine
from shunter.engine.load_report import LoadReport
from shunter.engine.outputs import ExecOutput, Executor, ScheduledRequest, SchedulerOutput
from shunter.engine.scheduler import RequestState, Scheduler

__all__ = [
    "BlockManager",
    "ExecOutput",
    "Executor",
    "InstanceEngine",
    "LoadReport",
    "RequestState",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
]
