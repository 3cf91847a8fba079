"""Sampler tests on random logits: no model needed."""

from __future__ import annotations

import torch

from shunter.model.sampler import Sampler, draw_seed
from shunter.request import SamplingParams

VOCAB = 1000


def random_logits(num_rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(8)
    tokens = Sampler(0).sample(logits, [SamplingParams(temperature=0)] * 8, [0] * 8)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits(16, seed=1)
    expected = logits.argmax(-1).tolist()
    sampler = Sampler(0)
    assert sampler.sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 16, list(range(16))) == expected
    assert sampler.sample(logits, [SamplingParams(temperature=1.5, top_p=1e-6)] * 16, list(range(16))) == expected


def test_top_k_only_picks_among_the_k_best():
    logits = random_logits(4, seed=2)
    top5 = logits.topk(5, dim=-1).indices
    sampler = Sampler(0)
    for _ in range(50):
        tokens = sampler.sample(logits, [SamplingParams(temperature=5.0, top_k=5)] * 4, [0] * 4)
        assert all(t in top5[i].tolist() for i, t in enumerate(tokens))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(0)
    seen = {sampler.sample(logits, [SamplingParams(top_p=0.7)], [0])[0] for _ in range(200)}
    assert seen == {0, 1}


def test_seeded_draw_ignores_batch_composition():
    logits = random_logits(6, seed=3)
    params = [SamplingParams(temperature=1.0, seed=100 + i, top_p=0.9 if i % 2 else 1.0) for i in range(6)]
    counts = [i * 3 for i in range(6)]
    together = Sampler(0).sample(logits, params, counts)
    alone = [Sampler(i).sample(logits[i:i + 1], [params[i]], [counts[i]])[0] for i in range(6)]
    assert together == alone
    # Mixed with greedy and unseeded rows, in another order.
    mixed_logits = torch.cat([random_logits(3, seed=9), logits.flip(0)])
    mixed_params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_k=3)]
    mixed = Sampler(7).sample(mixed_logits, mixed_params + params[::-1], [0, 0, 0] + counts[::-1])
    assert mixed[3:] == together[::-1]


def test_seeded_draws_change_with_the_output_count():
    logits = torch.zeros(1, VOCAB)  # uniform: any two draws collide with probability 1/VOCAB
    params = [SamplingParams(temperature=1.0, seed=5)]
    tokens = [Sampler().sample(logits, params, [n])[0] for n in range(20)]
    assert len(set(tokens)) > 15
    assert draw_seed(5, 3) == draw_seed(5, 3) != draw_seed(6, 3)


def test_temperature_sampling_matches_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    num_draws = 4000
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits[0] / temperature, -1)
        rows = logits.expand(num_draws, -1)
        tokens = Sampler(1).sample(rows, [SamplingParams(temperature=temperature)] * num_draws, [0] * num_draws)
        freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / num_draws
        # 4000 draws: standard error <= 0.008 per bucket.
        assert torch.allclose(freq, expected, atol=0.03), (temperature, freq, expected)


def test_unseeded_sampler_is_reproducible_with_its_own_seed():
    logits = random_logits(8, seed=4)
    params = [SamplingParams(temperature=1.0)] * 8
    assert Sampler(11).sample(logits, params, [0] * 8) == Sampler(11).sample(logits, params, [0] * 8)


def test_top_p_on_a_flat_distribution():
    # Nearly uniform over 1000 tokens: the 0.5 nucleus holds ~500 of them.
    logits = -torch.arange(VOCAB, dtype=torch.float32)[None, :] * 1e-4
    sampler = Sampler(0)
    tokens = [sampler.sample(logits, [SamplingParams(top_p=0.5)], [0])[0] for _ in range(400)]
    assert max(tokens) > 300
    assert max(tokens) < 520


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    sampler = Sampler(0)
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.6 then keeps the first two.
    seen = {sampler.sample(logits, [SamplingParams(top_k=3, top_p=0.6)], [0])[0] for _ in range(200)}
    assert seen == {0, 1}


def test_temperatures_too_small_for_float32_are_greedy():
    # Found by fuzzing the API: temperature 1e-300 is 0 in float32, and 1e-40 overflows logits / t; both
    # used to pick token id == vocab size (no token at all).
    logits = random_logits(4, seed=7)
    expected = logits.argmax(-1).tolist()
    for t in (1e-300, 1e-40, 1e-6):
        assert Sampler(0).sample(logits, [SamplingParams(temperature=t)] * 4, [0] * 4) == expected
    params = [SamplingParams(temperature=1e-40, top_p=0.5), SamplingParams(temperature=1.0)]
    assert all(0 <= t < VOCAB for t in Sampler(0).sample(logits[:2], params, [0, 0]))


def test_a_top_p_that_rounds_to_zero_keeps_the_heaviest_token():
    # Found by fuzzing the API: top_p 1e-300 is 0 in float32; the sampler raised an index error, which
    # failed the whole step (every request on the instance).
    logits = random_logits(4, seed=8)
    tokens = Sampler(0).sample(logits, [SamplingParams(temperature=1.0, top_p=1e-300)] * 4, [0] * 4)
    assert tokens == logits.argmax(-1).tolist()
