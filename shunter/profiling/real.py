"""The built-in model in an in-process engine, and one whole profiling run of it (torch, imported on use)."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import asdict, dataclass

from shunter.profiling.machine import CpuSnapshot, cpu_name, load_average
from shunter.profiling.profiler import STEP_SECONDS_MEANING, ProfileGrid, Profiler, engine_scheduler_config
from shunter.sim.profiled import BUILTIN_MODEL_NAME, HARDWARE_NAME, Profile


@dataclass
class RealEngine:
    """The built-in model in an `InstanceEngine`, and what describes it."""

    engine: object
    vocab_size: int
    max_model_len: int
    dtype: str
    threads: int
    attention_backend: str


def build_engine(dtype: str = "auto", threads: int | None = None, seed: int = 0) -> RealEngine:
    """Load the built-in model on CPU behind the engine limits of `engine_scheduler_config`."""
    import torch

    from shunter.engine import InstanceEngine
    from shunter.model import ModelExecutor, load_weights

    loaded = load_weights(None, dtype, "cpu")
    config = engine_scheduler_config(loaded.config.max_model_len)
    executor = ModelExecutor(loaded.model, config.num_blocks, config.block_size, num_threads=threads, seed=seed)
    return RealEngine(
        engine=InstanceEngine(config, executor),
        vocab_size=loaded.config.vocab_size,
        max_model_len=loaded.config.max_model_len,
        dtype=str(loaded.model.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        attention_backend=loaded.model.attention_backend,
    )



def profile_engine(real: RealEngine, grid: ProfileGrid, *, show_progress: bool = True, seed: int = 0,
                   rounds: int = 1):
    """Measure `grid` (`rounds` times over) on `real`; returns (Profile of the points, points, held-out fill steps)."""
    import torch

    bar = None
    load_before = load_average()
    cpu_before = CpuSnapshot.take()
    profiler = Profiler(real.engine, real.vocab_size, grid, seed=seed)
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=profiler.num_units(rounds), unit="pt", desc="profiling", leave=False)
        profiler.progress = bar.update
    t0 = time.perf_counter()
    try:
        points = profiler.run(rounds)
    finally:
        if bar is not None:
            bar.close()
    config = real.engine.config
    metadata = {
        "hardware": HARDWARE_NAME,
        "model": BUILTIN_MODEL_NAME,
        "dtype": real.dtype,
        "threads": real.threads,
        "block_size": config.block_size,
        "num_blocks": config.num_blocks,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs,
        "seconds": STEP_SECONDS_MEANING,
        "cpu": cpu_name(),
        "num_cpus": os.cpu_count(),
        "attention_backend": real.attention_backend,
        "torch": torch.__version__,
        "grid": asdict(grid),
        "rounds": rounds,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": {"before": load_before, "after": load_average()},
        "contended_steps_discarded": profiler.num_discarded,
        "other_processes_cpus": None if cpu_before is None else round(CpuSnapshot.take().others_since(cpu_before), 3),
        "profile_seconds": round(time.perf_counter() - t0, 1),
    }
    return Profile(metadata, [p.step for p in points]), points, profiler.held_out

