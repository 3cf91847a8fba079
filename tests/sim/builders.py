"""Small workloads and simulator set-ups for the simulator tests (no trace files needed)."""

from __future__ import annotations

import random

from shunter.config import SchedulerConfig
from shunter.sim.latency import ConstantLatency, RooflineLatency
from shunter.sim.hardware import get_gpu
from shunter.sim.models import get_model
from shunter.sim.simulator import SimConfig, Simulator
from shunter.sim.workloads import WorkloadRequest


def wr(request_id: str, arrival: float, prompt: int, output: int, prefix=None, priority: int = 0,
       ttft_slo=None, tpot_slo=None) -> WorkloadRequest:
    return WorkloadRequest(request_id, arrival, prompt, output, prefix, priority, ttft_slo, tpot_slo)


def random_workload(seed: int, n: int, rate: float, max_prompt: int = 300, max_output: int = 200,
                    prefixes: bool = False) -> list[WorkloadRequest]:
    """Poisson arrivals, uniform lengths; with `prefixes`, prompts share 512-token prefix blocks."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = rng.randint(1, max_prompt)
        blocks = tuple(rng.randint(0, 3) for _ in range(-(-prompt // 512))) if prefixes else None
        out.append(wr(f"r{i}", t, prompt, rng.randint(1, max_output), blocks,
                      priority=1 if rng.random() < 0.2 else 0))
    return out


def bursty_workload(seed: int, num_quiet: int = 15, num_burst: int = 250, quiet_rate: float = 1.0,
                    burst_rate: float = 80.0, num_after: int = 40) -> list[WorkloadRequest]:
    """A quiet phase, a burst, a quiet phase (each `random_workload`, one second apart); ids a*, b*, c*."""
    parts = (random_workload(seed, num_quiet, quiet_rate, max_prompt=200, max_output=100),
             random_workload(seed + 1, num_burst, burst_rate, max_prompt=400, max_output=300),
             random_workload(seed + 2, num_after, quiet_rate, max_prompt=200, max_output=100))
    out: list[WorkloadRequest] = []
    t0 = 0.0
    for name, part in zip("abc", parts):
        out += [wr(name + w.request_id, t0 + w.arrival_time, w.num_prompt_tokens, w.num_output_tokens,
                   priority=w.priority) for w in part]
        t0 = out[-1].arrival_time + 1.0
    return out


def small_scheduler(**kw) -> SchedulerConfig:
    defaults = dict(num_blocks=256, block_size=16, max_num_batched_tokens=512, max_num_seqs=32, max_model_len=2048)
    defaults.update(kw)
    return SchedulerConfig(**defaults)


def roofline() -> RooflineLatency:
    return RooflineLatency(get_gpu("a100-80gb"), get_model("llama-2-7b"))


def simulate(workload, latency=None, **config):
    config.setdefault("scheduler", small_scheduler())
    sim = Simulator(SimConfig(**config), latency or ConstantLatency(0.01), workload)
    return sim, sim.run()


def engine_state(sim: Simulator) -> list:
    """Everything observable in the instances' engines after a run (block manager order included)."""
    state = []
    for inst in sim.instances:
        bm = inst.scheduler.block_manager
        state.append((list(bm.free_block_ids), dict(bm.hash_to_block_id), list(bm.block_hashes),
                      list(bm.ref_counts), inst.engine.num_steps, sorted(inst.scheduler.requests),
                      list(inst.scheduler._finished_ids)))
    return state
