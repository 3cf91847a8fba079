"""Latency models: how long one engine step takes, given the batch the real scheduler built.

Every model maps a step's work — prefill chunks `(num_new_tokens, context_len)`,
the number of decodes and the sum of their context lengths — to seconds. The
simulator's `SimExecutor` summarises each `SchedulerOutput` into these numbers;
the decode fast path calls `decode_time(num_decodes, sum_context)`, which must
equal `step_time((), num_decodes, sum_context)` bit for bit (every model here
computes both through one function of integer aggregates, so it does).

Registered by name in `LATENCY_MODELS` as factories taking keyword options:
`roofline` (GPU catalog x model shape, see docs/simulator.md) and `profiled`
(a least-squares fit to measured steps of the real engine, `shunter.sim.profiled`).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from itertools import accumulate
from typing import Callable, Sequence

from shunter.engine import SchedulerOutput
from shunter.registry import Registry
from shunter.sim.hardware import GPU, get_gpu
from shunter.sim.models import ModelSpec, get_model

PrefillChunks = Sequence[tuple[int, int]]  # (num_new_tokens, context_len) per prefill chunk


def prefill_attention_pairs(num_new_tokens: int, context_len: int) -> int:
    """(query, key) pairs a causal prefill chunk computes: token i of the chunk attends to start + i + 1 keys."""
    start = context_len - num_new_tokens
    return num_new_tokens * start + num_new_tokens * (num_new_tokens + 1) // 2


def summarize_batch(batch: SchedulerOutput) -> tuple[list[tuple[int, int]], int, int]:
    """(prefill chunks, number of decodes, sum of decode context lengths) of a batch."""
    prefills: list[tuple[int, int]] = []
    num_decodes = 0
    sum_context = 0
    for s in batch.scheduled:
        n = s.num_new_tokens
        context = s.start_position + n
        if n == 1 and s.start_position >= len(s.request.prompt_token_ids):
            num_decodes += 1
            sum_context += context
        else:
            prefills.append((n, context))
    return prefills, num_decodes, sum_context


class LatencyModel:
    """Base: predicts a step's duration in seconds; subclasses implement `step_time`."""

    name = "base"

    def step_time(self, prefills: PrefillChunks, num_decodes: int, sum_decode_context: int) -> float:
        raise NotImplementedError

    def decode_time(self, num_decodes: int, sum_decode_context: int) -> float:
        """A decode-only step; equal to `step_time((), num_decodes, sum_decode_context)`."""
        return self.step_time((), num_decodes, sum_decode_context)

    def decode_times(self, num_decodes: int, sum_decode_context: int, num_steps: int) -> list[float]:
        """Durations of `num_steps` consecutive decode-only steps of the same batch.

        Step i has context sum `sum_decode_context + i * num_decodes` (every
        request grows by one token per step). Each value equals `decode_time`
        of that step exactly; subclasses may only speed up the computation.
        """
        return [self.decode_time(num_decodes, s)
                for s in range(sum_decode_context, sum_decode_context + num_steps * num_decodes, num_decodes)]

    def decode_step_ends(self, start: float, num_decodes: int, sum_decode_context: int, num_steps: int,
                         until: float) -> list[float]:
        """End times of up to `num_steps` back-to-back decode steps beginning at `start`.

        The end of step i is the end of step i-1 plus `decode_time` of step i,
        added one step at a time (as a step-by-step driver does). A step begins
        only before `until`; the list stops after the first end past `until`.
        """
        # `accumulate` makes the same float additions in the same order as `t = t + d` per step
        # (its running total starts at `start`), at C speed: this is the simulator's innermost loop.
        times = list(accumulate(self.decode_times(num_decodes, sum_decode_context, num_steps), initial=start))
        # times[i] is when step i begins; they increase (durations are > 0), so the steps that
        # begin before `until` are a prefix, and the last of them is the first to end past it.
        num_begun = bisect_left(times, until, 0, len(times) - 1)
        return times[1:num_begun + 1]

    def predict(self, batch: SchedulerOutput) -> float:
        prefills, num_decodes, sum_context = summarize_batch(batch)
        return self.step_time(prefills, num_decodes, sum_context)

    def kv_capacity_blocks(self, block_size: int, max_num_batched_tokens: int) -> int | None:
        """KV blocks per instance this model implies (None: it says nothing about memory)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}


class ConstantLatency(LatencyModel):
    """Every non-empty step takes `step_seconds` (for hand-computable tests)."""

    name = "constant"

    def __init__(self, step_seconds: float = 0.01) -> None:
        if not step_seconds > 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
        self.step_seconds = float(step_seconds)

    def step_time(self, prefills: PrefillChunks, num_decodes: int, sum_decode_context: int) -> float:
        return self.step_seconds

    def decode_time(self, num_decodes: int, sum_decode_context: int) -> float:
        return self.step_seconds

    def decode_times(self, num_decodes: int, sum_decode_context: int, num_steps: int) -> list[float]:
        return [self.step_seconds] * num_steps

    def describe(self) -> dict:
        return {"name": self.name, "step_seconds": self.step_seconds}


# ---- roofline ------------------------------------------------------------------------
# Efficiency factors, calibrated against published measurements (docs/simulator.md):
# - MFU 0.55: dense prefill GEMMs + FlashAttention-2 on A100 reach 50-60 % of peak;
#   with it Llama-2-7B prefill of 512 tokens on an A100-80GB comes out at ~42 ms
#   (vLLM measured 40.4 ms, FlightLLM artifact log) and of 2k tokens at ~165 ms
#   (150-200 ms in Sarathi-Serve / DistServe figures).
# - Bandwidth 0.80: GEMV-bound decode reaches ~80 % of datasheet HBM bandwidth.
# - Per-step overhead 3 ms: scheduling, sampling, kernel launches of a vLLM-class
#   engine; with it Llama-2-7B decode at batch 1 on an A100-80GB is ~11.5 ms
#   (vLLM measured 11.2 ms/token at batch 1, same log).
# - All-reduce latency 10 us per call: NCCL small-message latency over NVLink.
DEFAULT_MFU = 0.55
DEFAULT_BANDWIDTH_EFFICIENCY = 0.80
DEFAULT_STEP_OVERHEAD = 3e-3
DEFAULT_ALLREDUCE_LATENCY = 10e-6
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Decode durations are memoised for batches of up to this many decodes: at light load most
# steps are such batches, and a lone request at context 1,000 is the same step on every
# instance. A batch's steps walk its context sum in strides of its size, so a table holds a
# window of one stride (one residue class), grown at either end as runs need it. Larger
# batches seldom repeat a step; their durations are computed.
MEMO_MAX_DECODES = 16
MEMO_FILL_STEPS = 128  # a window grows upward by at least this many steps
MEMO_MAX_STEPS = 1 << 14  # a window's widest (128 KiB of doubles); steps beyond it are computed
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context + allocator slack counted by vLLM's memory probe


class RooflineLatency(LatencyModel):
    """Per layer max(compute time, memory time), summed over layers, plus LM head and a fixed overhead.

    Per layer, for a step with T new tokens, P (query, key) attention pairs,
    K KV tokens read (each chunk's or decode's whole context) and S sequences:
      compute = (2 T W + 4 d h P) / (peak * MFU)        (W: linear weights per layer per GPU,
                                                         h: heads per GPU, d: head dim)
      memory  = (W bytes + (K + T) kv bytes + T activation bytes) / (bandwidth * efficiency)
      layer   = max(compute, memory) + 2 all-reduces of T * hidden values (tp > 1)
    LM head: max(2 S hidden vocab / tp FLOPs, its weights' bytes), once per step.
    """

    name = "roofline"

    def __init__(self, gpu: GPU, model: ModelSpec, *, mfu: float = DEFAULT_MFU,
                 bandwidth_efficiency: float = DEFAULT_BANDWIDTH_EFFICIENCY,
                 step_overhead: float = DEFAULT_STEP_OVERHEAD,
                 allreduce_latency: float = DEFAULT_ALLREDUCE_LATENCY,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> None:
        if not (0 < mfu <= 1 and 0 < bandwidth_efficiency <= 1 and 0 < gpu_memory_utilization <= 1):
            raise ValueError("mfu, bandwidth_efficiency and gpu_memory_utilization must be in (0, 1]")
        if step_overhead < 0 or allreduce_latency < 0:
            raise ValueError("step_overhead and allreduce_latency must be >= 0")
        self.gpu = gpu
        self.model = model
        self.mfu = mfu
        self.bandwidth_efficiency = bandwidth_efficiency
        self.step_overhead = step_overhead
        self.allreduce_latency = allreduce_latency
        self.gpu_memory_utilization = gpu_memory_utilization

        tp = model.tp
        flops = gpu.peak_flops * mfu
        bandwidth = gpu.memory_bandwidth * bandwidth_efficiency
        layer_weights = model.params_per_layer / tp
        heads = model.num_heads / tp
        db = model.dtype_bytes
        # Seconds per unit of each aggregate, per layer (precomputed: this runs per step).
        self._s_per_token_flops = 2.0 * layer_weights / flops
        self._s_per_pair = 4.0 * model.head_dim * heads / flops
        self._s_weights = layer_weights * db / bandwidth
        self._s_per_kv_token = (model.kv_bytes_per_token / model.num_layers) / bandwidth
        # Activations in and out of each linear layer: ~4 hidden-sized + 3 intermediate-sized vectors.
        self._s_per_act_token = (4 * model.hidden_size + 3 * model.intermediate_size / tp) * db / bandwidth
        if tp > 1:
            ring = 2.0 * (tp - 1) / tp
            self._s_allreduce_per_token = 2.0 * ring * model.hidden_size * db / gpu.allreduce_bytes_per_s
            self._s_allreduce_fixed = 2.0 * allreduce_latency
        else:
            self._s_allreduce_per_token = 0.0
            self._s_allreduce_fixed = 0.0
        head_params = model.embedding_params / tp
        self._s_lm_head_per_seq = 2.0 * head_params / flops
        self._s_lm_head_weights = head_params * db / bandwidth
        self._num_layers = model.num_layers
        # Decode-step durations of small batches, by (batch size, context sum mod batch size):
        # the same steps recur all the time (see MEMO_MAX_DECODES).
        self._decode_memo: dict[tuple[int, int], _DurationWindow] = {}

    def _time(self, num_tokens: int, attention_pairs: int, kv_tokens_read: int, num_seqs: int) -> float:
        compute = num_tokens * self._s_per_token_flops + attention_pairs * self._s_per_pair
        memory = (self._s_weights + (kv_tokens_read + num_tokens) * self._s_per_kv_token
                  + num_tokens * self._s_per_act_token)
        layer = (compute if compute > memory else memory) + num_tokens * self._s_allreduce_per_token + self._s_allreduce_fixed
        head_compute = num_seqs * self._s_lm_head_per_seq
        head = head_compute if head_compute > self._s_lm_head_weights else self._s_lm_head_weights
        return self._num_layers * layer + head + self.step_overhead

    def step_time(self, prefills: PrefillChunks, num_decodes: int, sum_decode_context: int) -> float:
        num_tokens = num_decodes
        pairs = sum_decode_context
        kv_read = sum_decode_context
        for n, context in prefills:
            num_tokens += n
            pairs += prefill_attention_pairs(n, context)
            kv_read += context
        return self._time(num_tokens, pairs, kv_read, num_decodes + len(prefills))

    def decode_time(self, num_decodes: int, sum_decode_context: int) -> float:
        return self._time(num_decodes, sum_decode_context, sum_decode_context, num_decodes)

    def decode_times(self, num_decodes: int, sum_decode_context: int, num_steps: int) -> list[float]:
        b, s = num_decodes, sum_decode_context
        if num_steps <= 0:
            return []
        if b <= MEMO_MAX_DECODES:
            window = self._decode_memo.get((b, s % b))
            if window is None:
                window = self._decode_memo[b, s % b] = _DurationWindow(b, s, self._decode_durations)
            durations = window.get(s, num_steps)
            if durations is not None:
                return durations
        return self._decode_durations(b, range(s, s + num_steps * b, b))

    def _decode_durations(self, b: int, sums: range) -> list[float]:
        """`decode_time(b, s)` for each s in `sums`.

        `_time(b, s, s, b)` with the terms that depend only on b hoisted: every
        operation and its order are unchanged, so the values are bit-identical
        (tests/sim/test_fast_path.py checks it).
        """
        compute_b = b * self._s_per_token_flops
        s_pair = self._s_per_pair
        s_weights = self._s_weights
        s_kv = self._s_per_kv_token
        act_b = b * self._s_per_act_token
        allreduce_b = b * self._s_allreduce_per_token
        allreduce_fixed = self._s_allreduce_fixed
        head_compute = b * self._s_lm_head_per_seq
        head = head_compute if head_compute > self._s_lm_head_weights else self._s_lm_head_weights
        layers = self._num_layers
        overhead = self.step_overhead
        out = []
        for s in sums:
            compute = compute_b + s * s_pair
            memory = s_weights + (s + b) * s_kv + act_b
            layer = (compute if compute > memory else memory) + allreduce_b + allreduce_fixed
            out.append(layers * layer + head + overhead)
        return out

    def kv_capacity_blocks(self, block_size: int, max_num_batched_tokens: int) -> int:
        return kv_capacity_blocks(self.gpu, self.model, block_size, self.gpu_memory_utilization, max_num_batched_tokens)

    def describe(self) -> dict:
        return {"name": self.name, "hardware": self.gpu.name, "model": self.model.name, "tp": self.model.tp,
                "mfu": self.mfu, "bandwidth_efficiency": self.bandwidth_efficiency,
                "step_overhead": self.step_overhead}


class _DurationWindow:
    """Memoised durations of the decode steps of b decodes at context sums lo, lo + b, lo + 2b, ...

    `compute(b, sums)` gives the durations it lacks. It grows at either end as
    runs ask for steps outside it (upward by at least MEMO_FILL_STEPS, since a
    run's context keeps growing), up to MEMO_MAX_STEPS steps wide.
    """

    __slots__ = ("b", "lo", "durations", "compute")

    def __init__(self, b: int, lo: int, compute: Callable[[int, range], list[float]]) -> None:
        self.b = b
        self.lo = lo
        self.durations = array("d")
        self.compute = compute

    def get(self, s: int, num_steps: int) -> list[float] | None:
        """Durations of `num_steps` steps from context sum `s` (in this stride), or None if too far out."""
        b = self.b
        lo = self.lo
        end = lo + len(self.durations) * b
        hi = s + num_steps * b
        if s < lo or hi > end:
            new_lo = min(s, lo)
            new_end = max(hi, end + MEMO_FILL_STEPS * b) if hi > end else end
            if (new_end - new_lo) // b > MEMO_MAX_STEPS:
                return None
            if new_lo < lo:
                self.durations[:0] = array("d", self.compute(b, range(new_lo, lo, b)))
                self.lo = lo = new_lo
            if new_end > end:
                self.durations.extend(self.compute(b, range(end, new_end, b)))
        i = (s - lo) // b
        return self.durations[i:i + num_steps].tolist()


def activation_reserve_bytes(model: ModelSpec, max_num_batched_tokens: int) -> float:
    """Memory an engine's profiling run sets aside besides weights and KV (vLLM's `peak - weights`).

    CUDA context and allocator slack, plus the peak activations of a forward
    pass over `max_num_batched_tokens` tokens (the MLP's gate/up outputs and a
    few hidden-sized buffers, doubled for temporaries). With 4096 tokens this
    reproduces vLLM's 7,449 KV blocks for Llama-2-7B on an A100-80GB within 1 %.
    """
    per_token = (2 * model.intermediate_size / model.tp + 4 * model.hidden_size) * model.dtype_bytes * 2
    return CUDA_CONTEXT_BYTES + max_num_batched_tokens * per_token


def kv_capacity_blocks(gpu: GPU, model: ModelSpec, block_size: int,
                       gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
                       max_num_batched_tokens: int = 2048) -> int:
    """KV blocks of `block_size` tokens one instance holds: (memory x utilization - weights - reserve) / block bytes.

    Per GPU: every GPU of a tensor-parallel instance holds 1/tp of the weights
    and of the KV heads, so the instance's block count is the per-GPU count.
    """
    budget = (gpu.memory_bytes * gpu_memory_utilization - model.weight_bytes_per_gpu
              - activation_reserve_bytes(model, max_num_batched_tokens))
    blocks = int(budget // model.kv_bytes_per_block(block_size))
    if blocks <= 0:
        need = model.weight_bytes_per_gpu / 2**30
        raise ValueError(f"model {model.name} ({need:.1f} GiB of weights per GPU) leaves no room for a KV cache "
                         f"on {gpu.name} ({gpu.memory_bytes / 2**30:.0f} GiB); use a -tpN variant or a larger GPU")
    return blocks


# ---- registry --------------------------------------------------------------------------
LatencyFactory = Callable[..., LatencyModel]
LATENCY_MODELS: Registry[LatencyFactory] = Registry("latency model")


@LATENCY_MODELS.register("roofline")
def _roofline(*, hardware: str | None = None, model: str | None = None, **_) -> LatencyModel:
    if hardware is None or model is None:
        raise ValueError("the roofline latency model needs --hardware and --model")
    return RooflineLatency(get_gpu(hardware), get_model(model))


@LATENCY_MODELS.register("profiled")
def _profiled(*, profile: str | None = None, hardware: str | None = None, model: str | None = None,
              **_) -> LatencyModel:
    from shunter.sim.profiled import ProfiledLatency, packaged_profile

    if profile is None:
        profile = packaged_profile(hardware, model)  # shipped for --hardware cpu --model smollm2-135m
    if profile is None:
        raise ValueError("the profiled latency model needs --profile PATH (a profile JSON of the real engine), "
                         "or --hardware cpu --model smollm2-135m for the packaged profile")

    return ProfiledLatency.from_path(profile)


def build_latency_model(name: str, **options) -> LatencyModel:
    """The latency model registered as `name`, built from keyword options (hardware, model, profile)."""
    return LATENCY_MODELS.get(name)(**options)
