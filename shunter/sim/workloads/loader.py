"""`load_workload`: a `WorkloadSpec` in, the requests of the workload out, sorted by arrival.

`load_workload_with_clipping` also returns what fitting the lengths into
`max_model_len` cut off (a `Clipping`), for the caller to report.

Steps, in order: read the trace (or generate the synthetic one); take arrival
times from it or draw them; select the window and cap the count; shift to start
at 0; apply rate / rate_scale; clip lengths to max_model_len; label priorities
and SLOs. Each random draw has its own stream of `spec.seed`, so changing one
option does not reshuffle the others.
"""

from __future__ import annotations

import numpy as np

from shunter.sim.workloads.arrivals import generate_arrivals, spread_buckets
from shunter.sim.workloads.clipping import Clipping, clip_to_context
from shunter.sim.workloads.lengths import parse_lengths
from shunter.sim.workloads.request import PREFIX_BLOCK_TOKENS, WorkloadRequest
from shunter.sim.workloads.spec import WorkloadSpec
from shunter.sim.workloads.traces import SYNTHETIC, Trace, read_trace

DEFAULT_NUM_SYNTHETIC = 1000
DEFAULT_GENERATED_RATE = 1.0  # req/s of drawn arrivals when the spec gives no rate


def load_workload(spec: WorkloadSpec) -> list[WorkloadRequest]:
    """The requests `spec` describes; ValueError with one clear line if it cannot be met."""
    return load_workload_with_clipping(spec)[0]


def load_workload_with_clipping(spec: WorkloadSpec) -> tuple[list[WorkloadRequest], Clipping]:
    """`load_workload`'s requests, and what `spec.max_model_len` cut off their prompts and outputs."""
    seeds = np.random.SeedSequence(spec.seed).spawn(3)
    length_rng, arrival_rng, priority_rng = (np.random.default_rng(s) for s in seeds)
    trace = _synthetic_trace(spec, length_rng) if spec.trace == SYNTHETIC else read_trace(spec.trace)
    times = _source_times(spec, trace, arrival_rng)
    rows = _window(spec, trace, times)
    times = times[rows] - times[rows[0]]
    if spec.rate is not None and trace.arrival_times is not None:
        times = _rescaled(times, spec.rate)
    times = times / spec.rate_scale
    prompts, outputs, blocks, clipping = _clipped_lengths(spec, trace, rows)
    priorities = np.zeros(len(rows), dtype=np.int64)
    priorities[priority_rng.choice(len(rows), round(spec.priority_fraction * len(rows)), replace=False)] = 1
    request_ids = [f"{trace.name}-{r}" for r in trace.row_ids[rows].tolist()]
    columns = zip(request_ids, times.tolist(), prompts, outputs, blocks, priorities.tolist())
    requests = [WorkloadRequest(rid, t, p, o, b, pr, spec.ttft_slo, spec.tpot_slo)
                for rid, t, p, o, b, pr in columns]
    return requests, clipping


def _synthetic_trace(spec: WorkloadSpec, rng: np.random.Generator) -> Trace:
    n = spec.num_requests or DEFAULT_NUM_SYNTHETIC
    prompts = parse_lengths(spec.prompt_lengths).sample(rng, n)
    outputs = parse_lengths(spec.output_lengths).sample(rng, n)
    return Trace(SYNTHETIC, None, prompts, outputs, np.arange(n))


def _source_times(spec: WorkloadSpec, trace: Trace, rng: np.random.Generator) -> np.ndarray:
    """The source clock: the trace's arrival times, or arrivals drawn for a length-only source."""
    if trace.arrival_times is None:
        rate = spec.rate or DEFAULT_GENERATED_RATE
        return generate_arrivals(len(trace), rate, rng, spec.arrival or "poisson", spec.cv)
    if spec.arrival is not None:
        raise ValueError(f"trace {spec.trace} has its own arrival times; arrival/cv apply only to a "
                         "source without them")
    if trace.quantum_s is not None and spec.spread_buckets:
        return spread_buckets(trace.arrival_times, trace.quantum_s)
    return trace.arrival_times


def _window(spec: WorkloadSpec, trace: Trace, times: np.ndarray) -> np.ndarray:
    """Indices of the requests in [start, start + duration), at most max_requests of them."""
    end = np.inf if spec.duration is None else spec.start + spec.duration
    lo, hi = np.searchsorted(times, [spec.start, end], side="left")
    if spec.max_requests is not None:
        hi = min(hi, lo + spec.max_requests)
    if hi <= lo:
        end_text = "end" if spec.duration is None else f"{end:g}"
        raise ValueError(f"window [{spec.start:g}, {end_text}) s of trace {spec.trace} holds no requests; its "
                         f"{len(trace)} requests arrive from {times[0]:g} to {times[-1]:.1f} s")
    return np.arange(lo, hi)


def _rescaled(times: np.ndarray, rate: float) -> np.ndarray:
    """`times` (starting at 0) stretched so that (N-1)/span == rate."""
    if len(times) < 2 or times[-1] <= 0:
        raise ValueError(f"cannot rescale to rate {rate:g}: the window holds {len(times)} request(s) "
                         "spanning 0 s")
    return times * ((len(times) - 1) / (times[-1] * rate))


def _clipped_lengths(spec: WorkloadSpec, trace: Trace,
                     rows: np.ndarray) -> tuple[list[int], list[int], list[tuple[int, ...] | None], Clipping]:
    prompts, outputs, clipping = clip_to_context(trace.num_prompt_tokens[rows], trace.num_output_tokens[rows],
                                                 spec.max_model_len)
    if trace.prefix_block_ids is None:
        return prompts.tolist(), outputs.tolist(), [None] * len(rows), clipping
    # A clipped prompt keeps only the blocks it still touches.
    num_blocks = (-(-prompts // PREFIX_BLOCK_TOKENS)).tolist()
    blocks = [None if b is None else b[:k]
              for b, k in zip((trace.prefix_block_ids[r] for r in rows.tolist()), num_blocks)]
    return prompts.tolist(), outputs.tolist(), blocks, clipping
