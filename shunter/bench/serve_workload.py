"""The requests `shunter bench serve` sends: lengths and arrival times, and prompts of random words.

Lengths and arrivals come from the simulator's workload loader, so a served
replay and a simulated one of the same trace see the same requests: a
built-in trace (its own clock, optionally scaled) or random lengths like
vLLM's random dataset (uniform in [L(1 - r), L(1 + r)]), with Poisson
arrivals at a rate, or all at once. Every length is clipped to fit
`max_model_len`.

The server tokenizes, so a prompt is text: `num_prompt_tokens` common English
words, each about one token. Requests sharing Mooncake prefix blocks share
the words of those blocks, so a server's prefix cache sees the sharing the
trace records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from shunter.sim.workloads import Clipping, WorkloadRequest, WorkloadSpec, load_workload_with_clipping
from shunter.sim.workloads.request import PREFIX_BLOCK_TOKENS
from shunter.sim.workloads.traces import TRACES

# Short, frequent words: one token each (with their leading space) in the Llama and GPT tokenizers.
COMMON_WORDS = tuple(dict.fromkeys("""
the of and to in is was for on that with as by at from his an were are which be this had not or but
have first one their its new after who they has two her she been other when there all during into
school time may years more most only over city some world would where later up such used many can
state about national out known university united then made these team any under him since between
film through year three part well back also war while city game life both through best people same
water large high long small great old day work home world house place night group hand part point
case week company system number way country fact government book word side kind head name line end
member power family area story money month lot right study job health light music market level
form food party court report land road field table land sea town voice rule plan girl love view
black white red green blue open close early late young hard easy real sure free full clear true
""".split()))

# Random draws each get their own stream of the seed, so a change to one leaves the others as they were.
_PROMPT_STREAM, _BLOCK_STREAM, _BASELINE_STREAM = 1, 2, 3


@dataclass(frozen=True)
class ServeRequest:
    """A request to send `arrival_time` seconds after the start.

    prompt: `num_prompt_tokens` words (about as many tokens, once the server
        tokenizes them); max_tokens: the exact number to generate (sent with
        `ignore_eos`).
    after: the id of an earlier request that must have finished before this
        one is sent (a conversation's previous turn); None: no such wait.
    """

    request_id: str
    arrival_time: float
    prompt: str
    num_prompt_tokens: int
    max_tokens: int
    after: str | None = None


@dataclass(frozen=True)
class ServeWorkload:
    """Which requests to send.

    trace: a built-in trace name (`trace_names()`), or None for random lengths.
    rate: requests/s. None replays the trace's own clock (all at once when it
        has none or when there is no trace); a finite rate draws Poisson
        arrivals (a timed trace is rescaled to it instead); inf sends all at once.
    time_scale: a timed trace's arrival times are multiplied by it (0.5 = twice as fast).
    input_len, output_len, range_ratio: random lengths, uniform in [L(1 - r), L(1 + r)].
    max_model_len: prompts are cut to max_model_len - 1 tokens, outputs so that both fit.
    seed: seeds lengths, arrivals and prompt words.
    """

    num_requests: int = 200
    trace: str | None = None
    rate: float | None = None
    time_scale: float = 1.0
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    max_model_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trace is not None and self.trace not in trace_names():
            raise ValueError(f"unknown trace {self.trace!r}; built-in traces: {', '.join(trace_names())}")
        for name in ("num_requests", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s (or inf), got {self.rate}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale must be a finite number > 0, got {self.time_scale}")
        if self.time_scale != 1.0 and not self.has_trace_clock:
            raise ValueError("time_scale applies only to a trace replayed on its own clock (no rate)")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def has_trace_clock(self) -> bool:
        """Whether arrivals are the trace's own time stamps (scaled by `time_scale`)."""
        return self.rate is None and self.trace is not None and TRACES[self.trace].has_arrival_times

    @property
    def is_burst(self) -> bool:
        """Whether every request arrives at time 0."""
        return self.rate == math.inf or (self.rate is None and not self.has_trace_clock)

    def describe(self) -> str:
        """One line: where lengths and arrivals come from."""
        if self.trace is None:
            lengths = f"random lengths {self.input_len} in / {self.output_len} out (range ratio {self.range_ratio:g})"
        else:
            lengths = f"lengths of trace {self.trace}"
        if self.has_trace_clock:
            arrivals = "on the trace's clock" + (f" x{self.time_scale:g}" if self.time_scale != 1.0 else "")
        elif self.is_burst:
            arrivals = "all at once"
        elif self.trace is not None and TRACES[self.trace].has_arrival_times:
            arrivals = f"trace clock rescaled to {self.rate:g} req/s"
        else:
            arrivals = f"Poisson {self.rate:g} req/s"
        return (f"{self.num_requests} requests, {lengths}, {arrivals}, max_model_len {self.max_model_len}, "
                f"seed {self.seed}")


def trace_names() -> list[str]:
    """The built-in traces `ServeWorkload.trace` accepts."""
    return list(TRACES)


def build_requests(workload: ServeWorkload) -> tuple[list[ServeRequest], Clipping]:
    """The requests of `workload` sorted by arrival, and what `max_model_len` cut off their lengths."""
    spec = _workload_spec(workload)
    loaded, clipping = load_workload_with_clipping(spec)
    if workload.is_burst:
        loaded = [replace(r, arrival_time=0.0) for r in loaded]
    rng = np.random.default_rng((workload.seed, _PROMPT_STREAM))
    block_words: dict[int, list[str]] = {}
    requests = [ServeRequest(r.request_id, r.arrival_time, _prompt(r, rng, block_words, workload.seed),
                             r.num_prompt_tokens, r.num_output_tokens) for r in loaded]
    return requests, clipping


def baseline_requests(requests: list[ServeRequest], num_requests: int, seed: int) -> list[ServeRequest]:
    """The first `num_requests` requests' lengths, all at time 0, with fresh words.

    Fresh words so the main run does not find the baseline's prompts in the server's prefix cache.
    """
    rng = np.random.default_rng((seed, _BASELINE_STREAM))
    return [ServeRequest(f"baseline-{i}", 0.0, random_prompt(r.num_prompt_tokens, rng), r.num_prompt_tokens,
                         r.max_tokens) for i, r in enumerate(requests[:num_requests])]


def random_prompt(num_words: int, rng: np.random.Generator) -> str:
    """`num_words` words drawn uniformly from `COMMON_WORDS`, joined by spaces."""
    return " ".join(_random_words(num_words, rng))


def _random_words(num_words: int, rng: np.random.Generator) -> list[str]:
    return [COMMON_WORDS[i] for i in rng.integers(0, len(COMMON_WORDS), size=num_words).tolist()]


def _workload_spec(workload: ServeWorkload) -> WorkloadSpec:
    rate = workload.rate if workload.rate is not None and math.isfinite(workload.rate) else None
    common = dict(max_model_len=workload.max_model_len, seed=workload.seed)
    if workload.trace is None:
        return WorkloadSpec("synthetic", rate=rate, num_requests=workload.num_requests,
                            prompt_lengths=_uniform(workload.input_len, workload.range_ratio),
                            output_lengths=_uniform(workload.output_len, workload.range_ratio), **common)
    return WorkloadSpec(workload.trace, rate=rate, rate_scale=1.0 / workload.time_scale,
                        max_requests=workload.num_requests, **common)


def _uniform(length: int, range_ratio: float) -> str:
    """A length spec for uniform lengths in [L(1 - r), L(1 + r)], as vLLM's random dataset draws them."""
    lo, hi = max(1, int(length * (1 - range_ratio))), int(length * (1 + range_ratio))
    return f"fixed:{length}" if lo == hi else f"uniform:{lo}-{hi}"


def _prompt(request: WorkloadRequest, rng: np.random.Generator, block_words: dict[int, list[str]],
            seed: int) -> str:
    """The request's words: those of its prefix blocks (shared with every request naming them), then its own."""
    words: list[str] = []
    for block_id in request.prefix_block_ids or ():
        if len(words) >= request.num_prompt_tokens:
            break
        if block_id not in block_words:
            block_rng = np.random.default_rng((seed, _BLOCK_STREAM, block_id))
            block_words[block_id] = _random_words(PREFIX_BLOCK_TOKENS, block_rng)
        words += block_words[block_id]
    del words[request.num_prompt_tokens:]
    words += _random_words(request.num_prompt_tokens - len(words), rng)
    return " ".join(words)
