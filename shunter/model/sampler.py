"""Batched next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A seeded request draws its token from a generator seeded with
(seed, number of output tokens so far), so the same request gives the same
tokens whatever it is batched with, and after preemption or migration, with no
sampler state to carry between steps or instances. Each row's draw is one
uniform number fed to an inverse-CDF lookup, so rows never share random
streams. Requests without a seed share the sampler's global generator.
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

    def _uniforms(self, params: Sequence[SamplingParams], num_output_tokens: Sequence[int]) -> torch.Tensor:
        u = torch.empty(len(params), dtype=torch.float64)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator, dtype=torch.float64)
        for i, p in enumerate(params):
            if p.seed is not None:
                g = torch.Generator().manual_seed(draw_seed(p.seed, num_output_tokens[i]))
                u[i] = torch.rand(1, generator=g, dtype=torch.float64)
        return u

    def _sample_random(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], num_output_tokens: Sequence[int]
    ) -> torch.Tensor:
        vocab_size = logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        scaled = logits / temperature[:, None]
        if any(0 < p.top_k < vocab_size or p.top_p < 1.0 for p in params):
            scaled = _filter(scaled, params)
        # The draw is an inverse-CDF lookup in vocabulary order, so a row's token
        # depends only on its own logits and uniform, never on which filters its
        # batch neighbours needed. Unnormalised weights suffice: u is scaled by the total.
        weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp_()
        cdf = weights.cumsum(dim=-1)
        total = cdf[:, -1:]
        u = self._uniforms(params, num_output_tokens).to(logits.device, cdf.dtype)
        # Kept strictly below the total (rounding could reach it), the target's
        # first strictly greater cumulative weight always belongs to a token of
        # positive weight: filtered tokens are never picked.
        target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1)


# Top-p looks for its cut among this many best candidates first (a full sort of
# the vocabulary costs ~3.5 ms a row on CPU); only a row whose candidates hold
# less than top_p of the mass looks further.
TOP_P_CANDIDATES = 256


def _filter(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k set, then outside its top-p nucleus.

    Each row's cut is a logit threshold read from its own sorted logits, so the
    result never depends on the other rows.
    """
    num_rows, vocab_size = scaled.shape
    device = scaled.device
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    num_candidates = max([k for k in top_k if k < vocab_size], default=1)
    if top_p_rows:
        num_candidates = max(num_candidates, TOP_P_CANDIDATES)
    values = scaled.topk(min(num_candidates, vocab_size), dim=-1).values
    threshold = torch.full((num_rows, 1), float("-inf"), dtype=scaled.dtype, device=device)
    top_k_rows = [i for i, k in enumerate(top_k) if k < vocab_size]
    if top_k_rows:
        cutoff = torch.tensor([top_k[i] - 1 for i in top_k_rows], device=device)
        threshold[top_k_rows] = values[top_k_rows].gather(1, cutoff[:, None])
    for i in top_p_rows:
        limit = top_k[i]
        row_values = values[i, :limit]
        # Probabilities over the whole (top-k filtered) row, read for the best candidates.
        log_total = (row_values if limit < vocab_size else scaled[i]).logsumexp(dim=-1)
        probs = (row_values - log_total).exp()
        if probs.sum() < params[i].top_p and row_values.shape[0] < limit:
            # A flat distribution: the nucleus reaches past the candidates.
            row_values = scaled[i].topk(limit).values
            probs = (row_values - log_total).exp()
        # Keep the smallest prefix whose mass reaches top_p (the best token always stays).
        num_kept = int(((probs.cumsum(dim=-1) - probs) < params[i].top_p).sum())
        threshold[i] = torch.maximum(threshold[i], row_values[num_kept - 1])
    return scaled.masked_fill(scaled < threshold, float("-inf"))
