"""The `profiled` latency model: a least-squares fit to measured steps of the real engine.

Profile file (JSON), written by whoever measures the engine (`shunter profile`,
in `shunter.profiling`; this module only reads and fits, without torch):

    {
      "format": "shunter-profile",
      "version": 1,
      "metadata": {"hardware": "cpu", "model": "smollm2-135m", "dtype": "float32",
                   "threads": 2, "block_size": 16, "num_blocks": 512, ...},
      "steps": [
        {"prefill": [[128, 128], [64, 320]], "num_decodes": 3, "sum_decode_context": 345,
         "seconds": 0.0123},
        ...
      ]
    }

One entry per measured engine step: `prefill` lists each prefill chunk as
`[num_new_tokens, context_len]` (context_len = tokens whose KV the chunk attends
over after it runs, cached prefix included); decodes are summarised by their
count and the sum of their context lengths; `seconds` is the measured wall time
of the step (executor only or the whole step; say which in metadata). Extra
metadata keys are kept. `ProfileStep.from_batch(batch, seconds)` turns a real
`SchedulerOutput` into an entry and `Profile.save(path)` writes the file, so a
profiler needs nothing else.

Fit: seconds ~ a + b * prefill_tokens + c * prefill_attention_pairs
               + d * prefill_chunks + e * prefill_cached_tokens
               + f * num_decodes + g * sum_decode_context,
with non-negative coefficients (scipy's NNLS on columns scaled to unit norm),
minimising the relative error of each step (rows weighted by 1 / seconds).
`prefill_chunks` is each chunk's fixed cost (its own attention call per layer,
its mask); `prefill_cached_tokens` (context before the chunk) is the cost of
gathering a chunk's earlier KV out of the paged cache, which a chunk pays even
when it is small. On the CPU engine these two took the fit's mean error on a
real replay's steps from 5.8 % to 4.0 % and halved its bias on small decode
batches (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from shunter.engine import SchedulerOutput
from shunter.sim.latency import LatencyModel, PrefillChunks, prefill_attention_pairs, summarize_batch

FORMAT = "shunter-profile"
VERSION = 1
FEATURES = ("intercept", "prefill_tokens", "prefill_attention_pairs", "prefill_chunks", "prefill_cached_tokens",
            "num_decodes", "sum_decode_context")
REQUIRED_METADATA = ("hardware", "model", "dtype", "threads", "block_size", "num_blocks")

# The built-in model on a CPU, as `shunter simulate` names them: what `shunter profile` measures.
HARDWARE_NAME = "cpu"
BUILTIN_MODEL_NAME = "smollm2-135m"  # its name in `shunter.sim.models`
# Profiles shipped in shunter/sim/profiles/, by (hardware, model).
PACKAGED_PROFILES = {(HARDWARE_NAME, BUILTIN_MODEL_NAME): "cpu-smollm2-135m.json"}


def packaged_profile(hardware: str | None, model: str | None) -> str | None:
    """The path of the profile shipped for `hardware` x `model`, or None if there is none."""
    from importlib import resources

    name = PACKAGED_PROFILES.get((hardware, model))
    if name is None:
        return None
    path = resources.files("shunter.sim") / "profiles" / name
    return str(path) if path.is_file() else None


@dataclass
class ProfileStep:
    """One measured step: prefill chunks `(num_new_tokens, context_len)`, decodes, seconds.

    ended_at: when the step ended on the clock of whoever ran it (0.0 when not known).
    """

    prefill: list[tuple[int, int]]
    num_decodes: int
    sum_decode_context: int
    seconds: float
    ended_at: float = 0.0

    @classmethod
    def from_batch(cls, batch: SchedulerOutput, seconds: float, ended_at: float = 0.0) -> ProfileStep:
        prefills, num_decodes, sum_context = summarize_batch(batch)
        return cls(prefills, num_decodes, sum_context, seconds, ended_at)

    def features(self) -> list[float]:
        return step_features(self.prefill, self.num_decodes, self.sum_decode_context)

    def to_json(self) -> dict:
        return {"prefill": [list(c) for c in self.prefill], "num_decodes": self.num_decodes,
                "sum_decode_context": self.sum_decode_context, "seconds": self.seconds}


def prefill_aggregates(prefills: PrefillChunks) -> tuple[int, int, int]:
    """(prefill tokens, attention pairs, cached context tokens) summed over a step's prefill chunks."""
    tokens = 0
    pairs = 0
    cached = 0
    for n, context in prefills:
        tokens += n
        pairs += prefill_attention_pairs(n, context)
        cached += context - n
    return tokens, pairs, cached


def step_features(prefills: PrefillChunks, num_decodes: int, sum_decode_context: int) -> list[float]:
    """The values of `FEATURES` for one step."""
    tokens, pairs, cached = prefill_aggregates(prefills)
    return [1.0, float(tokens), float(pairs), float(len(prefills)), float(cached), float(num_decodes),
            float(sum_decode_context)]


@dataclass
class Profile:
    """Measured steps of one engine configuration plus what it ran on."""

    metadata: dict
    steps: list[ProfileStep] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "metadata": self.metadata,
                "steps": [s.to_json() for s in self.steps]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: object, source: str = "profile") -> Profile:
        """Validate and parse; ValueError naming the first problem."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a Shunter profile (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ValueError(f"{source}: profile version {data.get('version')!r} is not supported (expected {VERSION})")
        metadata = data.get("metadata")
        if not isinstance(metadata, dict):
            raise ValueError(f"{source}: \"metadata\" must be an object")
        missing = [k for k in REQUIRED_METADATA if k not in metadata]
        if missing:
            raise ValueError(f"{source}: metadata lacks {', '.join(missing)}")
        for key in ("block_size", "num_blocks"):
            if not isinstance(metadata[key], int) or metadata[key] <= 0:
                raise ValueError(f"{source}: metadata.{key} must be a positive integer, got {metadata[key]!r}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ValueError(f"{source}: \"steps\" must be a non-empty list of measured steps")
        steps = [_parse_step(s, f"{source}: steps[{i}]") for i, s in enumerate(raw_steps)]
        return cls(dict(metadata), steps)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_json(data, source=str(path))


def _parse_step(raw: object, where: str) -> ProfileStep:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    try:
        prefill = [(int(n), int(c)) for n, c in raw.get("prefill", [])]
        num_decodes = int(raw.get("num_decodes", 0))
        sum_context = int(raw.get("sum_decode_context", 0))
        seconds = float(raw["seconds"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: expected prefill [[num_new_tokens, context_len], ...], num_decodes, "
                         "sum_decode_context and seconds") from None
    if any(n <= 0 or c < n for n, c in prefill):
        raise ValueError(f"{where}: a prefill chunk needs 0 < num_new_tokens <= context_len")
    if num_decodes < 0 or sum_context < num_decodes:
        raise ValueError(f"{where}: need num_decodes >= 0 and sum_decode_context >= num_decodes")
    if not prefill and not num_decodes:
        raise ValueError(f"{where}: an empty step")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{where}: seconds must be a positive number")
    return ProfileStep(prefill, num_decodes, sum_context, seconds)


def fit_coefficients(steps: Sequence[ProfileStep]) -> dict[str, float]:
    """Non-negative least-squares coefficients of `FEATURES` for the measured steps.

    Each step's residual counts relative to its duration (rows weighted by
    1 / seconds): unweighted, the 0.5 s prefill steps outweigh the 30 ms decode
    steps and the decodes — which set TPOT — end up 15-25 % off. Columns are
    scaled to unit norm before NNLS so that seconds-per-token and
    seconds-per-pair (six orders of magnitude apart) are fitted alike; a
    feature the profile never exercises gets 0.
    """
    import numpy as np
    from scipy.optimize import nnls

    y = np.array([s.seconds for s in steps], dtype=np.float64)
    x = np.array([s.features() for s in steps], dtype=np.float64) / y[:, None]
    y = np.ones_like(y)
    norms = np.linalg.norm(x, axis=0)
    used = norms > 0
    solution, _ = nnls(x[:, used] / norms[used], y)
    coefficients = np.zeros(len(FEATURES))
    coefficients[used] = solution / norms[used]
    return {name: float(c) for name, c in zip(FEATURES, coefficients)}


class ProfiledLatency(LatencyModel):
    """Step time = the fitted linear model of the real engine's measured steps."""

    name = "profiled"

    def __init__(self, coefficients: dict[str, float], metadata: dict | None = None) -> None:
        missing = [f for f in FEATURES if f not in coefficients]
        if missing:
            raise ValueError(f"coefficients lack {', '.join(missing)}")
        if any(coefficients[f] < 0 for f in FEATURES):
            raise ValueError("coefficients must be non-negative")
        self.coefficients = {f: float(coefficients[f]) for f in FEATURES}
        self.metadata = dict(metadata or {})
        c = self.coefficients
        self._intercept = c["intercept"]
        self._per_prefill_token = c["prefill_tokens"]
        self._per_pair = c["prefill_attention_pairs"]
        self._per_chunk = c["prefill_chunks"]
        self._per_cached_token = c["prefill_cached_tokens"]
        self._per_decode = c["num_decodes"]
        self._per_decode_context = c["sum_decode_context"]
        self.fit_error: float | None = None  # mean |relative error| over the profile, set by from_profile
        if not (self.step_time([(1, 1)], 0, 0) > 0 and self.decode_time(1, 1) > 0):
            raise ValueError("the fitted model predicts zero time for a one-token step; the profile needs "
                             "steps of different sizes")

    @classmethod
    def from_profile(cls, profile: Profile) -> ProfiledLatency:
        model = cls(fit_coefficients(profile.steps), profile.metadata)
        errors = [abs(model.step_time(s.prefill, s.num_decodes, s.sum_decode_context) - s.seconds) / s.seconds
                  for s in profile.steps]
        model.fit_error = sum(errors) / len(errors)
        return model

    @classmethod
    def from_path(cls, path: str | Path) -> ProfiledLatency:
        return cls.from_profile(Profile.load(path))

    def step_time(self, prefills: PrefillChunks, num_decodes: int, sum_decode_context: int) -> float:
        if not prefills:
            return self.decode_time(num_decodes, sum_decode_context)
        tokens, pairs, cached = prefill_aggregates(prefills)
        prefill = (self._per_prefill_token * tokens + self._per_pair * pairs + self._per_chunk * len(prefills)
                   + self._per_cached_token * cached)
        return self.decode_time(num_decodes, sum_decode_context) + prefill

    def decode_time(self, num_decodes: int, sum_decode_context: int) -> float:
        return self._intercept + self._per_decode * num_decodes + self._per_decode_context * sum_decode_context

    def kv_capacity_blocks(self, block_size: int, max_num_batched_tokens: int) -> int | None:
        """The profiled engine's KV capacity in tokens, re-cut into blocks of `block_size`."""
        tokens = self.metadata.get("num_blocks", 0) * self.metadata.get("block_size", 0)
        return tokens // block_size if tokens else None

    def describe(self) -> dict:
        return {"name": self.name, "coefficients": self.coefficients, "fit_error": self.fit_error,
                "metadata": self.metadata}
