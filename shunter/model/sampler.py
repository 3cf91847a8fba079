"""Batched next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request draws its token from a generator seeded with
(seed, number of output tokens so far), so the same request gives the same
tokens whatever it is batched with, and after preemption or migration, with no
sampler state to carry between steps or instances. Each row's draws are
uniform numbers fed to inverse-CDF lookups in vocabulary order over its own
logits only, so rows never share random numbers or depend on one another.
Requests without a seed share the sampler's global generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shunter.request import SamplingParams

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, num_output_tokens: int) -> int:
    """A 63-bit generator seed mixed from a request seed and its output position (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + num_output_tokens) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class Sampler:
    """Samples one token per row of a logits matrix according to each row's `SamplingParams`."""

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        num_output_tokens: Sequence[int],
    ) -> list[int]:
        """Token ids, one per row of `logits` (`[num_rows, vocab]`, float32).

        `num_output_tokens[i]` is how many tokens row i's request has already
        produced: with a seed, it selects the draw.
        """
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = random_rows if len(random_rows) < len(params) else slice(None)
            chosen = self._sample_random(
                logits[rows], [params[i] for i in random_rows], [num_output_tokens[i] for i in random_rows]
            )
            tokens[rows] = chosen.to(tokens.device)
        return tokens.tolist()

    def _sample_random(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], num_output_tokens: Sequence[int]
    ) -> torch.Tensor:
        num_rows, vocab_size = logits.shape
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        scaled = logits / temperature[:, None]
        if any(0 < p.top_k < vocab_size for p in params):
            scaled = _mask_top_k(scaled, params)
        # Unnormalised probabilities; filtered tokens weigh 0.
        weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()
        # A top_p that rounds to 0 in this dtype would leave an empty nucleus (every draw rejected, then
        # none left to draw from): the smallest normal number keeps at least the heaviest token.
        top_p = torch.tensor([p.top_p for p in params], dtype=weights.dtype, device=device)
        top_p = top_p.clamp_min(torch.finfo(weights.dtype).tiny)
        nucleus_mass = top_p * weights.sum(dim=-1)
        streams = _UniformStreams(self.generator, params, num_output_tokens)
        tokens = torch.empty(num_rows, dtype=torch.long, device=device)
        # Top-p by rejection, with no sort of the vocabulary: draw among the
        # tokens heavier than `pivot`, accept if the mass of the tokens heavier
        # than the draw is below top_p (it is then in the nucleus), else raise
        # the pivot to the draw's weight and draw again. The nucleus always lies
        # above the pivot, so this samples it exactly; a draw lands in it with
        # probability >= top_p, so rounds are few, and each round shrinks the
        # candidates, so it ends. Rows with top_p = 1 take their first draw.
        active = torch.arange(num_rows, device=device)
        w, pivot = weights, None
        while True:
            candidates = w if pivot is None else torch.where(w > pivot, w, 0.0)
            picked = _inverse_cdf(candidates, streams.next(active.tolist()).to(device, w.dtype))
            tokens[active] = picked[:, 0]
            checked = (top_p[active] < 1.0).nonzero()[:, 0]
            if len(checked) == 0:
                return tokens
            w, picked = w[checked], picked[checked]
            picked_weight = w.gather(1, picked)
            mass_above = torch.where(w > picked_weight, w, 0.0).sum(dim=-1)
            rejected = (mass_above >= nucleus_mass[active[checked]]).nonzero()[:, 0]
            if len(rejected) == 0:
                return tokens
            active, w, pivot = active[checked[rejected]], w[rejected], picked_weight[rejected]


class _UniformStreams:
    """One stream of uniform numbers per row, drawn in order, one number per call.

    A seeded row's stream comes from a generator seeded with (seed, output
    count), so its draws do not depend on the batch; unseeded rows share the
    sampler's global generator.
    """

    def __init__(self, generator: torch.Generator, params: Sequence[SamplingParams], num_output_tokens: Sequence[int]):
        self._shared = generator
        self._own = [
            None if p.seed is None else torch.Generator().manual_seed(draw_seed(p.seed, n))
            for p, n in zip(params, num_output_tokens)
        ]

    def next(self, rows: list[int]) -> torch.Tensor:
        """The next uniform in [0, 1) of each of `rows`, as a float64 CPU tensor."""
        u = torch.empty(len(rows), dtype=torch.float64)
        shared_rows = [i for i, row in enumerate(rows) if self._own[row] is None]
        if shared_rows:
            u[shared_rows] = torch.rand(len(shared_rows), generator=self._shared, dtype=torch.float64)
        for i, row in enumerate(rows):
            generator = self._own[row]
            if generator is not None:
                u[i] = torch.rand(1, generator=generator, dtype=torch.float64)
        return u


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index `[rows, 1]` drawn per row with probability proportional to `weights`, from uniforms `u`.

    The target is kept strictly below the total (rounding could reach it), so
    the first strictly greater cumulative weight always belongs to a token of
    positive weight: zero-weight tokens are never picked.
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)


def _mask_top_k(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) the logits below each row's k-th largest (ties at the k-th stay)."""
    vocab_size = scaled.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    values = scaled.topk(max(k for k in top_k if k < vocab_size), dim=-1).values
    limited = [i for i, k in enumerate(top_k) if k < vocab_size]
    threshold = torch.full((scaled.shape[0], 1), float("-inf"), dtype=scaled.dtype, device=scaled.device)
    cutoff = torch.tensor([top_k[i] - 1 for i in limited], device=scaled.device)
    threshold[limited] = values[limited].gather(1, cutoff[:, None])
    return scaled.masked_fill(scaled < threshold, float("-inf"))
