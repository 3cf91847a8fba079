"""`WorkloadSpec`: which requests to replay or generate, and how to shape them. No I/O here."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from shunter.sim.workloads.arrivals import ARRIVAL_PROCESSES
from shunter.sim.workloads.lengths import parse_lengths
from shunter.sim.workloads.traces import SYNTHETIC, TRACES, list_traces


@dataclass
class WorkloadSpec:
    """A workload: a trace (or the synthetic generator) plus windowing, scaling and labels.

    trace: a built-in name (`list_traces()`) or a path to a file in one of their
        formats (a path holds '/' or a file extension).
    start, duration: the window [start, start + duration) of the source clock in
        seconds: the trace's own (from its first request), or the generated
        arrivals at `rate`. Times are then shifted so the first request is at 0.
    rate_scale: arrival times are divided by it (2 = twice as fast).
    rate: mean requests/s wanted. A trace with arrival times is rescaled so that
        (N-1)/span equals it exactly; generated arrivals are drawn at this rate
        (default 1 req/s). Excludes `rate_scale`.
    max_requests: keep only the first this many requests of the window.
    max_model_len: prompts are cut to max_model_len - 1 tokens (and their prefix
        blocks with them), outputs so that prompt + output <= max_model_len.
    seed: seeds every random draw (arrivals, lengths, priorities) independently.
    priority_fraction: this fraction of requests (rounded) gets priority 1.
    ttft_slo, tpot_slo: seconds, set on every request.
    spread_buckets: spread requests sharing a quantised time stamp over their
        bucket (the Mooncake conversation trace's 3 s); False replays each
        bucket as one burst.
    arrival, cv: the arrival process where the source has no arrival times
        (synthetic, sharegpt, a length-only file): "poisson" (default) or
        "gamma" with coefficient of variation `cv`.
    prompt_lengths, output_lengths, num_requests: the synthetic generator's
        length specs (`fixed:N`, `uniform:LO-HI`, `zipf:THETA:LO-HI`) and size
        (default 1000).
    """

    trace: str
    start: float = 0.0
    duration: float | None = None
    rate_scale: float = 1.0
    rate: float | None = None
    max_requests: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    priority_fraction: float = 0.0
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    spread_buckets: bool = True
    arrival: str | None = None
    cv: float | None = None
    prompt_lengths: str | None = None
    output_lengths: str | None = None
    num_requests: int | None = None

    def __post_init__(self) -> None:
        self.trace = os.fspath(self.trace)
        if not self.is_path and self.trace not in list_traces():
            raise ValueError(f"unknown trace {self.trace!r}; built-in traces: {', '.join(list_traces())} "
                             f"(or a file path such as ./{self.trace}.csv)")
        _check_number("start", self.start, minimum=0.0)
        _check_number("duration", self.duration, positive=True, optional=True)
        _check_number("rate_scale", self.rate_scale, positive=True)
        _check_number("rate", self.rate, positive=True, optional=True)
        if self.rate is not None and self.rate_scale != 1.0:
            raise ValueError("give either rate or rate_scale, not both")
        _check_int("max_requests", self.max_requests, minimum=1)
        _check_int("max_model_len", self.max_model_len, minimum=2)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        _check_number("priority_fraction", self.priority_fraction, minimum=0.0)
        if self.priority_fraction > 1:
            raise ValueError(f"priority_fraction must be in [0, 1], got {self.priority_fraction!r}")
        _check_number("ttft_slo", self.ttft_slo, positive=True, optional=True)
        _check_number("tpot_slo", self.tpot_slo, positive=True, optional=True)
        self._check_generator_fields()

    @property
    def is_path(self) -> bool:
        """Whether `trace` names a file rather than a built-in trace."""
        return "/" in self.trace or os.sep in self.trace or "." in self.trace

    def _check_generator_fields(self) -> None:
        if self.arrival is not None and self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVAL_PROCESSES)}, got {self.arrival!r}")
        if self.arrival == "gamma" and self.cv is None:
            raise ValueError("arrival 'gamma' needs cv (the inter-arrival coefficient of variation)")
        if self.cv is not None:
            if self.arrival != "gamma":
                raise ValueError("cv applies only to arrival 'gamma'")
            _check_number("cv", self.cv, positive=True)
        builtin = TRACES.get(self.trace)
        if self.arrival is not None and builtin is not None and builtin.has_arrival_times:
            raise ValueError(f"trace {self.trace!r} has its own arrival times; arrival/cv apply only to "
                             f"{SYNTHETIC}, sharegpt or a length-only file")
        is_synthetic = self.trace == SYNTHETIC
        for name in ("prompt_lengths", "output_lengths"):
            value = getattr(self, name)
            if value is None and is_synthetic:
                raise ValueError(f"the {SYNTHETIC} workload needs {name}, e.g. 'zipf:1.0:1-6000'")
            if value is not None:
                if not is_synthetic:
                    raise ValueError(f"{name} applies only to trace {SYNTHETIC!r}")
                parse_lengths(value)
        if self.num_requests is not None:
            if not is_synthetic:
                raise ValueError(f"num_requests applies only to trace {SYNTHETIC!r}; use max_requests")
            _check_int("num_requests", self.num_requests, minimum=1)


def _check_number(name: str, value: object, *, minimum: float | None = None, positive: bool = False,
                  optional: bool = False) -> None:
    if value is None and optional:
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or (positive and value <= 0) or (minimum is not None and value < minimum):
        bound = "> 0" if positive else f">= {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
