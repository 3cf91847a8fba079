"""`summarize`: a serving run's records in, its throughput and latency figures out (pure, no I/O).

Latencies are over successful requests only, in milliseconds: TTFT, TPOT
(requests of at least two tokens), ITL (every gap between chunks with text,
pooled over requests, as vLLM's benchmark does) and E2E. Percentiles use
numpy's default linear interpolation, as the simulator's metrics do.
Throughput divides the successful requests' tokens by the run's duration.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from shunter.bench.serve_load import ServeRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


def summarize(records: Sequence[ServeRecord], duration_s: float | None = None) -> dict:
    """Counts, errors by kind, throughput and latency statistics of `records`.

    duration_s: the run's wall time; None takes it from the records (the last
    successful request's end, from the run's start).
    """
    done = [r for r in records if r.is_success]
    if duration_s is None:
        duration_s = max((r.send_time + r.e2e for r in done), default=0.0)
    num_input = sum(r.num_prompt_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    per_second = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2e": [r.e2e for r in done],
    }
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_errors": len(records) - len(done),
        "errors_by_kind": dict(sorted(Counter(r.error_kind for r in records if not r.is_success).items())),
        "duration_s": duration_s,
        "num_input_tokens": num_input,
        "num_output_tokens": num_output,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(num_output),
        "total_token_throughput": per_second(num_input + num_output),
        **{f"{name}_ms": latency_stats(samples[name]) for name in LATENCY_METRICS},
    }


def latency_stats(seconds: Sequence[float]) -> dict:
    """{"mean", "p50", "p90", "p99"} in milliseconds of `seconds`; every value None when it is empty."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if len(seconds) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return dict(zip(keys, [float(ms.mean()), *(float(v) for v in np.percentile(ms, PERCENTILES))]))


def p50_ratios(summary: dict, baseline: dict) -> dict:
    """Main-run P50 TTFT and TPOT over the baseline's ({"ttft": x, "tpot": y}); None where either lacks one."""
    ratios = {}
    for name in ("ttft", "tpot"):
        main, base = summary[f"{name}_ms"]["p50"], baseline[f"{name}_ms"]["p50"]
        ratios[name] = main / base if main is not None and base else None
    return ratios
