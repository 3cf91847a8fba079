"""Length distributions of synthetic workloads, named by short specs.

`fixed:N`, `uniform:LO-HI` (inclusive), `zipf:THETA:LO-HI`: the bounded Zipf of
the Llumnix evaluation, P(LO + r - 1) proportional to r**-THETA for ranks
r = 1 .. HI-LO+1, so short lengths are the most frequent (THETA = 0 is uniform).
Llumnix's benchmark also rescales the samples to a target mean afterwards; here
the spec alone fixes the distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_LENGTH = 10_000_000  # bounds the Zipf table; far beyond any model's context
_FORMS = "expected 'fixed:N', 'uniform:LO-HI' or 'zipf:THETA:LO-HI' with 1 <= LO <= HI"


@dataclass(frozen=True)
class LengthDist:
    """Token counts drawn from `kind` over [lo, hi]; `theta` is the Zipf exponent."""

    kind: str
    lo: int
    hi: int
    theta: float = 0.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths as an int64 array."""
        if self.kind == "fixed":
            return np.full(n, self.lo, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
        cdf = np.cumsum(np.arange(1, self.hi - self.lo + 2, dtype=np.float64) ** -self.theta)
        ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        return self.lo + np.minimum(ranks, len(cdf) - 1).astype(np.int64)


def parse_lengths(text: str) -> LengthDist:
    """Parse a length spec; ValueError naming the spec if it is malformed."""
    parts = text.split(":") if isinstance(text, str) else []
    try:
        if len(parts) == 2 and parts[0] == "fixed":
            lo = hi = _length(parts[1])
            return _checked(LengthDist("fixed", lo, hi))
        if len(parts) == 2 and parts[0] == "uniform":
            return _checked(LengthDist("uniform", *_range(parts[1])))
        if len(parts) == 3 and parts[0] == "zipf":
            theta = float(parts[1])
            if not math.isfinite(theta) or theta < 0:
                raise ValueError
            return _checked(LengthDist("zipf", *_range(parts[2]), theta))
    except ValueError:
        pass
    raise ValueError(f"bad length spec {text!r}: {_FORMS}, lengths at most {MAX_LENGTH:,}, THETA >= 0")


def _length(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError
    return int(text)


def _range(text: str) -> tuple[int, int]:
    lo, hi = text.split("-")  # ValueError unless exactly one '-'
    return _length(lo), _length(hi)


def _checked(dist: LengthDist) -> LengthDist:
    if not 1 <= dist.lo <= dist.hi <= MAX_LENGTH:
        raise ValueError
    return dist
