"""Arrival times: generated processes and the repair of quantised trace clocks."""

from __future__ import annotations

import numpy as np

ARRIVAL_PROCESSES = ("poisson", "gamma")


def generate_arrivals(n: int, rate: float, rng: np.random.Generator, process: str = "poisson",
                      cv: float | None = None) -> np.ndarray:
    """`n` arrival times in seconds, the first at 0, of a renewal process at `rate` req/s.

    poisson: exponential gaps. gamma: gaps with coefficient of variation `cv`
    (shape 1/cv**2, mean 1/rate), burstier than Poisson when cv > 1, as in the
    Llumnix evaluation.
    """
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    elif process == "gamma":
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    else:
        raise ValueError(f"unknown arrival process {process!r}; choose from {', '.join(ARRIVAL_PROCESSES)}")
    return np.concatenate(([0.0], np.cumsum(gaps)))


def spread_buckets(times: np.ndarray, quantum: float) -> np.ndarray:
    """Spread requests that share a quantised time stamp evenly over its bucket.

    `times` must be sorted. The k requests stamped t get t, t + q/k, ...,
    t + (k-1)q/k, so a replay sees a steady stream instead of a batch every q s.
    """
    _, first, counts = np.unique(times, return_index=True, return_counts=True)
    rank = np.arange(len(times)) - np.repeat(first, counts)
    return times + quantum * rank / np.repeat(counts, counts)
