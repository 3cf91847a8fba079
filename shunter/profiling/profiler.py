"""The profiling grid and the driver that times it on an engine (any executor; no torch here).

Every measured batch is built by the real scheduler from requests with chosen
prompt lengths, never by hand:

1. decode grid: for each context length C, B_max requests with C-token prompts
   are prefilled together (the "fill": chunked prefill mixed with the decodes
   of requests already filled); then, shrinking the batch by aborting
   requests, decode-only steps at each batch size B;
2. mixed steps: at a few of those batch sizes, a fresh request of n prompt
   tokens joins, so the step is B decodes plus one n-token prefill chunk;
3. prefill grid: one chunk of n tokens after a cached prefix of o tokens (a
   request whose first o tokens hit the prefix cache), for a few n and o.

A step's `seconds` is its whole wall time, schedule + execute + update
(`begin_step` to the end of `end_step`): that is what the simulator's clock
must advance per step. Each grid point is repeated and its mean kept; the
fill steps (measured once each) are not fitted but kept as held-out steps,
to show how the fit does on steps it has not seen.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from shunter.config import SchedulerConfig
from shunter.profiling.machine import load_average, runqueue_wait_seconds, wait_until_idle
from shunter.request import Request, SamplingParams
from shunter.sim.profiled import ProfileStep

# The scheduler limits of the profiled engine and of the fidelity benchmark's real instance.
BLOCK_SIZE = 16
NUM_BLOCKS = 4096  # 65,536 tokens of KV: 1.5 GB in bfloat16 for the built-in model
MAX_NUM_BATCHED_TOKENS = 512
MAX_NUM_SEQS = 64
STEP_SECONDS_MEANING = ("wall time of the whole engine step: schedule + execute + update "
                        "(InstanceEngine.begin_step to the end of end_step), mean of the repeats not slowed "
                        "by other processes")
LOW_TOKEN_ID = 100  # prompts avoid the special tokens at the start of the vocabulary


def engine_scheduler_config(max_model_len: int) -> SchedulerConfig:
    """The scheduler limits shared by `shunter profile` and `shunter bench fidelity`."""
    return SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                           max_num_seqs=MAX_NUM_SEQS, max_model_len=max_model_len, enable_prefix_caching=True)


@dataclass(frozen=True)
class ProfileGrid:
    """What the profiler measures (see the module docstring).

    Decode points whose B * C exceeds `max_decode_tokens` are skipped (their
    fill would dominate the run and their KV would not fit the cache).
    """

    decode_batch_sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    max_decode_tokens: int = 32 * 1024
    mixed_batch_sizes: tuple[int, ...] = (4, 16, 32)
    # Chunk sizes spread over the whole budget, most of them not powers of two: on
    # the CPU a 488-token step takes longer than a 512-token one (the matmul
    # kernels' tiling), so a grid of aligned sizes alone would fit the fastest
    # shapes and under-predict the real workload's arbitrary ones by 10-20 %.
    mixed_chunks: tuple[int, ...] = (40, 136, 264, 392, 456)
    prefill_chunks: tuple[int, ...] = (16, 48, 96, 160, 232, 304, 376, 440, 488, 512)
    prefill_offsets: tuple[int, ...] = (0, 256, 1024)
    repeats: int = 5
    warmup_steps: int = 4

    def batch_sizes_at(self, context: int) -> list[int]:
        """Decode batch sizes measured at `context`, largest first."""
        return sorted((b for b in self.decode_batch_sizes if b * context <= self.max_decode_tokens), reverse=True)

    def check(self, config: SchedulerConfig) -> None:
        """ValueError if a point cannot be built under `config`'s limits."""
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        budget = config.max_num_batched_tokens
        if max(self.decode_batch_sizes) > min(config.max_num_seqs, budget):
            raise ValueError(f"decode batch sizes must not exceed max_num_seqs {config.max_num_seqs}")
        for n in self.prefill_chunks:
            if not 1 <= n <= budget:
                raise ValueError(f"prefill chunks must be within 1..{budget} tokens, got {n}")
        for o in self.prefill_offsets:
            if o < 0 or o % config.block_size:
                raise ValueError(f"prefill offsets must be multiples of the block size {config.block_size}, got {o}")
        for b in self.mixed_batch_sizes:
            if b >= config.max_num_seqs:
                raise ValueError(f"a mixed step needs room for one more request than its {b} decodes "
                                 f"(max_num_seqs {config.max_num_seqs})")
            for n in self.mixed_chunks:
                if b + n > budget:
                    raise ValueError(f"a mixed step of {b} decodes and {n} prefill tokens exceeds the budget {budget}")


DEFAULT_GRID = ProfileGrid()
QUICK_GRID = ProfileGrid(decode_batch_sizes=(1, 4, 16), decode_contexts=(64, 256), mixed_batch_sizes=(4, 16),
                         mixed_chunks=(64, 256), prefill_chunks=(32, 128, 512), prefill_offsets=(0, 256),
                         repeats=2, warmup_steps=2)


@dataclass
class GridPoint:
    """One measured point: what it is, the step that was measured, and every repeat's seconds."""

    kind: str  # "decode" | "mixed" | "prefill"
    label: str
    step: object  # ProfileStep with the median seconds
    samples: list[float] = field(default_factory=list)


class MachineBusyError(RuntimeError):
    """Other processes kept taking this process's CPUs, so the steps could not be timed cleanly."""


class Profiler:
    """Drives one engine through the grid; every step is timed with `clock` around begin_step/end_step.

    Contention guard: a step during which this process's threads waited for a
    CPU for more than `max_contention` of its wall time is discarded and
    measured again after `pause()` (default: until other processes use under
    0.2 CPUs, at most 10 minutes); `wait_seconds()` reads the waiting (default:
    Linux schedstat). After `max_retries` discarded steps in one phase,
    `MachineBusyError`.
    """

    def __init__(self, engine, vocab_size: int, grid: ProfileGrid, *, clock: Callable[[], float] = time.perf_counter,
                 seed: int = 0, progress: Callable[[int], None] | None = None,
                 wait_seconds: Callable[[], float | None] = runqueue_wait_seconds, max_contention: float = 0.10,
                 max_retries: int = 64, pause: Callable[[], None] | None = None) -> None:
        grid.check(engine.config)
        self.engine = engine
        self.vocab_size = vocab_size
        self.grid = grid
        self.clock = clock
        self.rng = random.Random(seed)
        self.progress = progress
        self.wait_seconds = wait_seconds
        self.max_contention = max_contention
        self.max_retries = max_retries
        # Before measuring again, wait (up to 10 minutes) until other processes leave the CPUs alone.
        self.pause = pause or (lambda: wait_until_idle(600.0, report=lambda message: None))
        self.points: list[GridPoint] = []
        self._by_label: dict[str, GridPoint] = {}
        self.held_out: list = []  # ProfileStep of every uncontended fill step
        self.num_discarded = 0  # steps measured again because of contention
        self._retries_left = max_retries
        self._ids = 0

    def num_units(self, rounds: int = 1) -> int:
        """Progress units `run(rounds)` reports: one per grid point and fill per round, one for the warm-up."""
        g = self.grid
        decode = sum(len(g.batch_sizes_at(c)) for c in g.decode_contexts)
        mixed = sum(len(g.mixed_chunks) for c in g.decode_contexts for b in g.batch_sizes_at(c)
                    if b in g.mixed_batch_sizes)
        per_round = decode + mixed + len(g.decode_contexts) + len(g.prefill_chunks) * len(g.prefill_offsets)
        return rounds * per_round + 1

    def run(self, rounds: int = 1) -> list[GridPoint]:
        """Measure the grid `rounds` times over; a point's samples are its repeats of every round.

        Several rounds spread each point's samples over the whole run, so a
        slow or fast minute of the machine weighs on every point alike.
        """
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.warmup()
        self._tick()
        for _ in range(rounds):
            for context in self.grid.decode_contexts:
                self._decode_and_mixed(context)
            for offset in self.grid.prefill_offsets:
                self._prefill(offset)
        return self.points

    # ---- building blocks ---------------------------------------------------------
    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(LOW_TOKEN_ID, self.vocab_size) for _ in range(n)]

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        self._ids += 1
        rid = f"profile-{self._ids}"
        self.engine.add_request(Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True)))
        return rid

    def _step(self, num_prefill: int | None = None, num_decodes: int | None = None):
        """One timed engine step: (its ProfileStep or None if contended, the batch).

        Raises RuntimeError if the scheduler built another batch than the one wanted.
        """
        waited = self.wait_seconds()
        start = self.clock()
        batch, result = self.engine.begin_step(start)
        if batch.is_empty:
            raise RuntimeError("the profiler stepped an engine with nothing to run")
        self.engine.end_step(batch, result, self.clock())
        seconds = self.clock() - start
        if (num_prefill is not None and batch.num_prefill_tokens != num_prefill) or (
                num_decodes is not None and batch.num_decodes != num_decodes):
            raise RuntimeError(f"the scheduler built {batch.num_prefill_tokens} prefill tokens and {batch.num_decodes} "
                               f"decodes where the grid wanted {num_prefill} and {num_decodes}")
        after = self.wait_seconds()
        if waited is not None and after is not None and after - waited > self.max_contention * seconds:
            return None, batch
        return ProfileStep.from_batch(batch, seconds), batch

    def _clean_samples(self, measure: Callable[[], object]) -> list:
        """`grid.repeats` uncontended results of `measure()` (which returns a ProfileStep or None)."""
        samples = []
        while len(samples) < self.grid.repeats:
            step = measure()
            if step is not None:
                samples.append(step)
                continue
            self.num_discarded += 1
            self._retries_left -= 1
            if self._retries_left < 0:
                raise MachineBusyError(
                    f"other processes kept this machine's CPUs busy ({self.num_discarded} steps slowed by waiting for "
                    f"a CPU, load average {load_average()}); profile when the machine is idle")
            self.pause()
        return samples

    def _abort(self, request_ids) -> None:
        now = self.clock()
        for rid in request_ids:
            self.engine.abort_request(rid, now)

    def _drain(self) -> None:
        while self.engine.has_unfinished_requests:
            self._step()

    def _record(self, kind: str, label: str, steps: list) -> None:
        """One point: the middle repeat's batch summary with the mean time of all repeats.

        The mean, not the median: step times have a right-skewed jitter (at 2
        threads the slowest tenth of identical decode steps takes 1.3-1.5x the
        fastest tenth) and latencies add step times up, so the simulator needs
        their expectation; a median would under-predict TPOT by a few percent.
        The outliers a median guards against, steps slowed by other processes,
        never get here (see `_clean_samples`).
        """
        earlier = self._by_label.get(label)
        if earlier is not None:  # a later round: pool the samples
            earlier.samples.extend(s.seconds for s in steps)
            earlier.step.seconds = statistics.fmean(earlier.samples)
        else:
            middle = steps[len(steps) // 2]
            point = replace(middle, seconds=statistics.fmean(s.seconds for s in steps))
            self._by_label[label] = GridPoint(kind, label, point, [s.seconds for s in steps])
            self.points.append(self._by_label[label])
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(1)

    # ---- phases ----------------------------------------------------------------------
    def warmup(self) -> None:
        """Pay one-time costs (kernel set-up, allocator growth) before anything is timed."""
        budget = self.engine.config.max_num_batched_tokens
        for _ in range(max(1, self.grid.warmup_steps // 2)):
            self._add(self._tokens(budget), 1)
        for _ in range(8):
            self._add(self._tokens(16), self.grid.warmup_steps + 1)
        self._drain()

    def _decode_and_mixed(self, context: int) -> None:
        g = self.grid
        sizes = g.batch_sizes_at(context)
        if not sizes:
            return
        largest = sizes[0]
        self._retries_left = self.max_retries
        # Enough tokens for the fill, every measurement and every retry: no request finishes on its own.
        fill_steps = -(-largest * context // self.engine.config.max_num_batched_tokens) + largest
        measure_steps = len(sizes) * g.repeats * (1 + len(g.mixed_chunks))
        max_tokens = fill_steps + measure_steps + self.max_retries + 8
        running = [self._add(self._tokens(context), max_tokens) for _ in range(largest)]
        scheduler = self.engine.scheduler
        while scheduler.waiting or any(not scheduler.requests[r].output_token_ids for r in running):
            step, _ = self._step()
            if step is not None:
                self.held_out.append(step)
        self._tick()
        for b in sizes:
            self._abort(running[b:])
            running = running[:b]
            steps = self._clean_samples(lambda: self._step(0, b)[0])
            self._record("decode", f"B={b} ctx~{context}", steps)
            if b not in g.mixed_batch_sizes:
                continue
            for n in g.mixed_chunks:
                def mixed(n=n, b=b):
                    self._add(self._tokens(n), 1)  # prefilled and finished in this one step
                    return self._step(n, b)[0]

                self._record("mixed", f"B={b} ctx~{context} + chunk {n}", self._clean_samples(mixed))
        self._abort(running)

    def _prefill(self, offset: int) -> None:
        g = self.grid
        self._retries_left = self.max_retries
        prefix = self._tokens(offset)
        if offset:
            self._add(prefix, 1)  # computes the prefix once; its full blocks stay in the prefix cache
            self._drain()
        for n in g.prefill_chunks:
            def chunk(n=n):
                self._add(prefix + self._tokens(n), 1)
                step = self._step(n, 0)[0]
                self._drain()
                return step

            self._record("prefill", f"chunk {n} at offset {offset}", self._clean_samples(chunk))

