"""Per-request latency records and their summaries.

TTFT: arrival -> first token (queueing included). TPOT: (E2E - TTFT) / (n - 1)
for a request of n output tokens (undefined for n = 1, which then meets any
TPOT objective). E2E: arrival -> last token. Percentiles use numpy's default
linear interpolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

GOODPUT_ATTAINMENT = 0.9  # goodput: the highest rate at which >= 90 % of requests meet both SLOs


@dataclass(slots=True)
class RequestRecord:
    """What one finished request experienced."""

    request_id: str
    instance_id: str  # where it finished
    arrival_time: float
    first_token_time: float
    finish_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    priority: int = 0
    num_preemptions: int = 0
    num_migrations: int = 0
    recomputed_tokens: int = 0
    ttft_slo: float | None = None
    tpot_slo: float | None = None

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def has_slo(self) -> bool:
        return self.ttft_slo is not None or self.tpot_slo is not None

    def meets_slo(self) -> bool:
        """Both objectives that are set are met (an unset one always is)."""
        if self.ttft_slo is not None and self.ttft > self.ttft_slo:
            return False
        tpot = self.tpot
        if self.tpot_slo is not None and tpot is not None and tpot > self.tpot_slo:
            return False
        return True

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, e2e=self.e2e)
        return d


def summarize(values: Iterable[float]) -> dict[str, float | None]:
    """{mean, p50, p90, p99} of `values` in their unit; all None when there are none."""
    import numpy as np

    arr = np.fromiter(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def slo_attainment(records: Sequence[RequestRecord], num_unserved: int = 0) -> float | None:
    """Fraction of requests meeting every SLO they carry; None when no request carries one.

    `num_unserved` requests (rejected, never finished) count as misses.
    """
    with_slo = [r for r in records if r.has_slo]
    if not with_slo:
        return None
    return sum(1 for r in with_slo if r.meets_slo()) / (len(with_slo) + num_unserved)
