"""`shunter profile`: measure the real engine's steps on this machine and write a profile JSON.

    shunter profile --json cpu.json                 # default grid, a few minutes on 2 cores
    shunter simulate --latency-model profiled --profile cpu.json ...

The built-in model runs in-process (`InstanceEngine` + `ModelExecutor`, the
scheduler limits of `engine_scheduler_config`, the same as `shunter bench
fidelity`). Every measured batch is built by the real scheduler from requests
with chosen prompt lengths, never by hand:

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
fill steps (measured once each) are not fitted but reported as held-out
steps, to show how the fit does on steps it has not seen.

Other processes: torch runs one thread per core, so a neighbour that takes a
core for a moment stalls every thread at the next barrier and a step can run
5-15x slower. A step whose threads waited for a CPU (Linux schedstat) for more
than a tenth of its time is measured again; `--wait-idle` first waits for the
machine to be idle; the metadata records how much other processes ran.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from shunter.config import SchedulerConfig
from shunter.errors import CLIError, one_line_error

# The scheduler limits of the profiled engine and of the fidelity benchmark's real instance.
BLOCK_SIZE = 16
NUM_BLOCKS = 4096  # 65,536 tokens of KV: 1.5 GB in bfloat16 for the built-in model
MAX_NUM_BATCHED_TOKENS = 512
MAX_NUM_SEQS = 64
BUILTIN_MODEL_NAME = "smollm2-135m"  # its name in `shunter.sim.models`
HARDWARE_NAME = "cpu"
STEP_SECONDS_MEANING = ("wall time of the whole engine step: schedule + execute + update "
                        "(InstanceEngine.begin_step to the end of end_step), mean of the repeats not slowed "
                        "by other processes")
LOW_TOKEN_ID = 100  # prompts avoid the special tokens at the start of the vocabulary


# Profiles shipped in shunter/sim/profiles/, by (hardware, model) as `shunter simulate` names them.
PACKAGED_PROFILES = {(HARDWARE_NAME, BUILTIN_MODEL_NAME): "cpu-smollm2-135m.json"}


def packaged_profile(hardware: str | None, model: str | None) -> str | None:
    """The path of the profile shipped for `hardware` x `model`, or None if there is none."""
    from importlib import resources

    name = PACKAGED_PROFILES.get((hardware, model))
    if name is None:
        return None
    path = resources.files("shunter.sim") / "profiles" / name
    return str(path) if path.is_file() else None


def engine_scheduler_config(max_model_len: int) -> SchedulerConfig:
    """The scheduler limits shared by `shunter profile` and `shunter bench fidelity`."""
    return SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                           max_num_seqs=MAX_NUM_SEQS, max_model_len=max_model_len, enable_prefix_caching=True)


@dataclass(frozen=True)
class ProfileGrid:
    """What `shunter profile` measures (see the module docstring).

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


def runqueue_wait_seconds() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU, or None where unknown.

    Linux schedstat (`/proc/self/task/*/schedstat`, second field). A step
    whose threads waited for a CPU was slowed by other processes: with torch's
    OpenMP threads on every core, one descheduled thread stalls all of them at
    the next barrier, so a single busy neighbour can make a step 5-15x slower.
    """
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time used so far by the whole machine and by this process, at a moment."""

    machine_busy: float
    own: float
    time: float

    @classmethod
    def take(cls) -> CpuSnapshot | None:
        """None where /proc/stat cannot be read (not Linux)."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (steal counts: others ran)
        return cls(busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic())

    def others_since(self, earlier: CpuSnapshot) -> float:
        """CPUs' worth of work other processes did between `earlier` and this snapshot."""
        span = self.time - earlier.time
        if span <= 0:
            return 0.0
        return max(0.0, (self.machine_busy - earlier.machine_busy) - (self.own - earlier.own)) / span


def wait_until_idle(max_wait: float, *, threshold: float = 0.2, window: float = 2.0,
                    report: Callable[[str], None] = print) -> float | None:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` CPUs over `window` s.

    Returns the CPUs they used over the last window (None where unknown).
    """
    deadline = time.monotonic() + max_wait
    reported = False
    while True:
        before = CpuSnapshot.take()
        if before is None:
            return None
        time.sleep(window)
        others = CpuSnapshot.take().others_since(before)
        if others < threshold or time.monotonic() >= deadline:
            return others
        if not reported:
            report(f"other processes use {others:.1f} CPUs; waiting up to {max_wait:.0f} s for the machine to be idle")
            reported = True


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
        from shunter.request import Request, SamplingParams

        self._ids += 1
        rid = f"profile-{self._ids}"
        self.engine.add_request(Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True)))
        return rid

    def _step(self, num_prefill: int | None = None, num_decodes: int | None = None):
        """One timed engine step: (its ProfileStep or None if contended, the batch).

        Raises RuntimeError if the scheduler built another batch than the one wanted.
        """
        from shunter.sim.profiled import ProfileStep

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


# ---- the real engine ------------------------------------------------------------------------
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


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def profile_engine(real: RealEngine, grid: ProfileGrid, *, show_progress: bool = True, seed: int = 0,
                   rounds: int = 1):
    """Measure `grid` (`rounds` times over) on `real`; returns (Profile of the points, points, held-out fill steps)."""
    import datetime

    import torch

    from shunter.sim.profiled import Profile

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


# ---- reporting -------------------------------------------------------------------------------
# How `format_report` prints each fitted coefficient: (scale, unit).
COEFFICIENT_UNITS = {
    "intercept": (1e-3, "ms"),
    "prefill_tokens": (1e-6, "us/token"),
    "prefill_attention_pairs": (1e-9, "ns/pair"),
    "prefill_chunks": (1e-3, "ms/chunk"),
    "prefill_cached_tokens": (1e-6, "us/cached token"),
    "num_decodes": (1e-6, "us/decode"),
    "sum_decode_context": (1e-9, "ns/context token"),
}


def format_report(model, points: list[GridPoint], held_out: list) -> str:
    """The measured table with the fit's predictions, its coefficients and its errors."""
    lines = [f"{'kind':<8} {'point':<34} {'mean ms':>11} {'spread':>7} {'fit ms':>8} {'error':>7}"]
    errors = []
    for p in points:
        s = p.step
        predicted = model.step_time(s.prefill, s.num_decodes, s.sum_decode_context)
        err = (predicted - s.seconds) / s.seconds
        errors.append(abs(err))
        spread = (max(p.samples) - min(p.samples)) / s.seconds if len(p.samples) > 1 else 0.0
        lines.append(f"{p.kind:<8} {p.label:<34} {s.seconds * 1e3:>11.1f} {spread:>6.0%} "
                     f"{predicted * 1e3:>8.1f} {err:>+7.1%}")
    lines.append("")
    lines.append("fit: seconds = intercept + the sum of coefficient x feature (non-negative least squares):")
    for name, value in model.coefficients.items():
        scale, unit = COEFFICIENT_UNITS[name]
        lines.append(f"  {name:<24} {value / scale:>9.3f} {unit}")
    lines.append(f"  relative error on the {len(points)} grid points: mean {statistics.fmean(errors):.1%}, "
                 f"max {max(errors):.1%}")
    if held_out:
        held = [abs(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) - s.seconds) / s.seconds
                for s in held_out]
        lines.append(f"  held-out fill steps ({len(held)}, measured once each): mean error {statistics.fmean(held):.1%}, "
                     f"median {statistics.median(held):.1%}")
    return "\n".join(lines)


def fit_summary(model, points: list[GridPoint], held_out: list) -> dict:
    def errors(steps):
        return [abs(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) - s.seconds) / s.seconds
                for s in steps]

    grid_errors = errors([p.step for p in points])
    summary = {"coefficients": model.coefficients, "grid_mean_error": statistics.fmean(grid_errors),
               "grid_max_error": max(grid_errors)}
    if held_out:
        held = errors(held_out)
        summary.update(held_out_mean_error=statistics.fmean(held), held_out_median_error=statistics.median(held))
    return summary


# ---- the command -------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="measure the real engine's step times on this machine (profile JSON for the simulator)",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", dest="json_path", default="profile.json", metavar="PATH", help="write the profile here")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype (auto: bfloat16 where the CPU computes it natively)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--quick", action="store_true", help="a small grid (under a minute; for tests)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the grid this many times over and pool the samples (averages out a machine "
                        "whose speed drifts from minute to minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPUs alone")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_profile)
    p.error = one_line_error


def run_profile(args: argparse.Namespace) -> int:
    threads = args.threads if args.threads is not None else default_threads()
    if threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    out = Path(args.json_path)
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if args.wait_idle < 0:
        raise ValueError(f"--wait-idle must be >= 0 seconds, got {args.wait_idle}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    from shunter.sim.profiled import ProfiledLatency

    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    real = build_engine(args.dtype, threads, args.seed)
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    print(f"profiling {BUILTIN_MODEL_NAME} ({real.dtype}, {real.threads} threads, decode attention "
          f"{real.attention_backend}) on {cpu_name()}; load average {load_average()}")
    try:
        profile, points, held_out = profile_engine(real, grid, show_progress=not args.quiet and sys.stderr.isatty(),
                                                   seed=args.seed, rounds=args.rounds)
    except MachineBusyError as e:
        raise CLIError(str(e)) from None
    model = ProfiledLatency.from_profile(profile)
    profile.metadata["fit"] = fit_summary(model, points, held_out)
    print(format_report(model, points, held_out))
    profile.save(out)
    meta = profile.metadata
    print(f"wrote {out} ({len(profile.steps)} steps, {meta['profile_seconds']:.0f} s; load average "
          f"{meta['load_average']}, other processes used {meta['other_processes_cpus']} CPUs; "
          f"{meta['contended_steps_discarded']} steps slowed by them measured again)")
    return 0
