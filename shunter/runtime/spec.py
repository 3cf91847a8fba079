"""What an instance is made of (`InstanceSpec`) and how an engine is built from it.

The spec is plain data: the frontend writes it, the instance's own process
(a Ray actor, or this process for in-process instances) builds the engine from
it, so the weights are loaded where they run. Torch is imported only to build
the real model's executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

from shunter.config import SchedulerConfig
from shunter.engine import InstanceEngine

EXECUTORS = ("model", "null")
KV_CHANNELS = ("shared-memory", "object-store", "torch-distributed")
# A background stage's copy at full memory speed slows the source's memory-bound decode steps by
# about 5 %; at 1 GB/s by about 1 % (docs/benchmarks.md, "Live migration"), and 8k tokens of the
# built-in model's KV still move in under 0.2 s.
DEFAULT_MIGRATION_COPY_RATE = 1e9


@dataclass
class InstanceSpec:
    """One instance's model, executor and scheduler limits.

    model: a local checkpoint directory (the frontend passes the converted
        cache of a GGUF file) or None for the built-in model.
    executor: "model" (the real model runner) or "null" (instant tokens:
        `null_token_ids`, no model; for benchmarks of everything around it).
    num_threads: torch intra-op threads of this instance (None: torch's default).
    num_blocks: KV-cache blocks (None: sized for the device).
    max_model_len: the context (None: the model's own; at most the model's).
    report_interval: seconds between the load reports the instance pushes.
    kv_channel: how live migration moves KV between Ray-actor instances: "shared-memory" (the
        destination reads the source's cache directly when both are on one machine with CPU
        caches; Ray's object store where that cannot work), "object-store" (always Ray's
        object store; the cache is then private memory) or "torch-distributed" (the source sends
        the blocks to the destination over a gloo link between the two processes; private caches).
    migration_copy_rate: bytes per second at most for the copies of a live migration's
        background stages over shared memory (those that run while the request still decodes at
        the source); None: unpaced. The final stage, while the request waits, is never paced.
    cpu_affinity: the CPU cores a Ray-actor instance computes on (its engine loop and torch's
        threads), so instances sharing a machine do not take each other's cores; None: wherever
        the OS puts it.
    control_cpu_affinity: the cores of the instance's other threads (Ray's, which receive calls,
        and the threads that answer them and copy KV for migrations), when they should not take
        time from the steps on `cpu_affinity`, as a GPU instance's steps lose none to its CPU
        answering calls; None: the same cores as `cpu_affinity`.
    """

    model: str | None = None
    executor: str = "model"
    dtype: str = "auto"
    device: str | None = None
    num_threads: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    report_interval: float = 0.05
    seed: int | None = 0
    null_token_ids: list[int] = field(default_factory=lambda: [42])
    null_step_time: float = 0.0
    kv_channel: str = "shared-memory"
    migration_copy_rate: float | None = DEFAULT_MIGRATION_COPY_RATE
    cpu_affinity: tuple[int, ...] | None = None
    control_cpu_affinity: tuple[int, ...] | None = None
    record_steps: bool = False  # keep every step's batch summary and time (benchmarks: `recorded_steps`)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}: use one of {', '.join(EXECUTORS)}")
        if self.kv_channel not in KV_CHANNELS:
            raise ValueError(f"unknown KV channel {self.kv_channel!r}: use one of {', '.join(KV_CHANNELS)}")
        if self.migration_copy_rate is not None and self.migration_copy_rate <= 0:
            raise ValueError(f"migration copy rate must be positive or None, got {self.migration_copy_rate!r}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive, got {self.num_threads!r}")
        if self.report_interval <= 0:
            raise ValueError(f"report interval must be positive, got {self.report_interval!r}")
        cores = os.cpu_count() or 1
        for name in ("cpu_affinity", "control_cpu_affinity"):
            value = getattr(self, name)
            if value is not None and (not value or any(not 0 <= c < cores for c in value)):
                raise ValueError(f"{name} must name cores within 0..{cores - 1}, got {value!r}")
        if self.control_cpu_affinity is not None and self.cpu_affinity is None:
            raise ValueError("control_cpu_affinity needs cpu_affinity (the cores the instance computes on)")

    def scheduler_config(self, num_blocks: int, model_max_len: int) -> SchedulerConfig:
        max_len = model_max_len if self.max_model_len is None else self.max_model_len
        if max_len > model_max_len:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context of {model_max_len} tokens")
        return SchedulerConfig(
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_prefill_chunk=self.max_prefill_chunk,
            max_model_len=max_len,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    def replace(self, **changes) -> InstanceSpec:
        return dataclasses.replace(self, **changes)


# A null instance's context and KV capacity when the spec leaves them open.
NULL_MAX_MODEL_LEN = 8192
NULL_NUM_BLOCKS = 8192


def thread_ids() -> list[int]:
    """The native ids of this process's threads (Linux)."""
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def pin_threads(tids, cores: tuple[int, ...]) -> None:
    """Run these threads, and the threads each of them starts later, on `cores` only (Linux)."""
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a thread that has ended meanwhile
            pass


def pin_process(cores: tuple[int, ...]) -> None:
    """Run every thread of this process, and every thread it starts later, on `cores` only (Linux)."""
    pin_threads(thread_ids(), cores)


@contextlib.contextmanager
def pinned_compute(cores: tuple[int, ...] | None, control_cores: tuple[int, ...] | None = None):
    """Threads started inside the block (an engine's loop, torch's threads) run on `cores`; the
    threads that existed before it (in a Ray actor: Ray's, which receive calls and start the threads
    that answer them, and this one) move to `control_cores` at its end, when given. Nothing changes
    when `cores` is None."""
    existing = thread_ids()
    if cores is not None:
        pin_threads(existing, cores)  # the threads started inside inherit it
    yield
    if cores is not None and control_cores is not None:
        pin_threads(existing, control_cores)


def build_engine(spec: InstanceSpec, instance_id: str) -> tuple[InstanceEngine, dict]:
    """The engine of `spec` and facts about it (dtype, device, threads, pid) for the admin API."""
    facts: dict = {"pid": os.getpid(), "executor": spec.executor}
    if spec.executor == "null":
        from shunter.runtime.null_executor import NullExecutor

        config = spec.scheduler_config(spec.num_blocks or NULL_NUM_BLOCKS, spec.max_model_len or NULL_MAX_MODEL_LEN)
        return InstanceEngine(config, NullExecutor(spec.null_token_ids, spec.null_step_time), instance_id), facts

    import torch

    from shunter.model import ModelExecutor, default_num_blocks, load_weights

    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    loaded = load_weights(spec.model, spec.dtype, spec.device)
    dtype, device = loaded.model.dtype, loaded.model.device
    num_blocks = spec.num_blocks or default_num_blocks(loaded.config, spec.block_size, dtype, device)
    config = spec.scheduler_config(num_blocks, loaded.config.max_model_len)
    executor = ModelExecutor(loaded.model, num_blocks, spec.block_size, seed=spec.seed,
                             share_kv=spec.kv_channel == "shared-memory")
    facts.update(dtype=str(dtype).removeprefix("torch."), device=str(device), num_threads=torch.get_num_threads())
    return InstanceEngine(config, executor, instance_id), facts
