"""Workloads for the simulator: real traces shipped with Shunter and synthetic generators.

    spec = WorkloadSpec("azure2023_conv", start=600, duration=300, rate=8.0, max_model_len=4096)
    requests = load_workload(spec)          # list[WorkloadRequest], sorted by arrival
    requests, clipping = load_workload_with_clipping(spec)  # and what max_model_len cut off
    ids = prompt_token_ids(requests[0])     # synthetic prompt ids that keep prefix sharing

`list_traces()` names the built-in sources; see `shunter/sim/traces/README.md`.
"""

from shunter.sim.workloads.arrivals import generate_arrivals
from shunter.sim.workloads.clipping import Clipping
from shunter.sim.workloads.lengths import LengthDist, parse_lengths
from shunter.sim.workloads.loader import load_workload, load_workload_with_clipping
from shunter.sim.workloads.request import WorkloadRequest, prompt_token_ids
from shunter.sim.workloads.spec import WorkloadSpec
from shunter.sim.workloads.traces import list_traces

__all__ = [
    "Clipping",
    "LengthDist",
    "WorkloadRequest",
    "WorkloadSpec",
    "generate_arrivals",
    "list_traces",
    "load_workload",
    "load_workload_with_clipping",
    "parse_lengths",
    "prompt_token_ids",
]
