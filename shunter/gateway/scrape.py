"""A remote backend's load, read from its own Prometheus `/metrics` (vLLM's or SGLang's names).

`parse_metrics` reads the text format into a `Scraped` snapshot; `load_report`
turns a snapshot into the `LoadReport` the dispatch policies read, the same
dataclass a local instance pushes. What the metrics do not say (how many
blocks a waiting request needs, how much prefill is queued) is estimated from
the requests the gateway itself has in flight there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from shunter.engine import LoadReport

# Either name may be exported, depending on the server's version.
_VLLM = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "hits": ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"),
    "queries": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"),
}
_SGLANG = {
    "running": ("sglang:num_running_reqs",),
    "waiting": ("sglang:num_queue_reqs",),
    "usage": ("sglang:token_usage",),
    "hit_rate": ("sglang:cache_hit_rate",),
    "max_tokens": ("sglang:max_total_num_tokens",),
}
# Capacity assumed when a server does not export its KV cache size: only the usage fraction is then known.
DEFAULT_NUM_BLOCKS = 10_000
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Scraped:
    """One scrape of a backend's metrics (summed over its engines when it runs several).

    kv_usage: fraction of its KV cache in use (0..1).
    num_total_blocks, block_size: its KV capacity, when it exports them.
    prefix_hits, prefix_queries: cumulative prefix-cache counters in tokens (vLLM).
    prefix_hit_rate: SGLang's own hit-rate gauge (it exports no counters).
    """

    source: str
    num_running: int
    num_waiting: int
    kv_usage: float
    num_total_blocks: int | None = None
    block_size: int | None = None
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    prefix_hit_rate: float | None = None


def parse_samples(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text -> {metric name: [(label text, value), ...]}, vLLM's and SGLang's metrics only."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if not line.startswith(("vllm:", "sglang:")):
            continue  # comments, HELP/TYPE lines, the process's own metrics
        brace = line.find("{")
        if brace >= 0:
            close = line.rfind("}")
            name, labels, rest = line[:brace], line[brace + 1:close], line[close + 1:]
        else:
            name, _, rest = line.partition(" ")
            labels = ""
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        out.setdefault(name, []).append((labels, value))
    return out


def parse_metrics(text: str) -> Scraped | None:
    """The load in a `/metrics` text; None when it has neither vLLM's nor SGLang's metrics."""
    samples = parse_samples(text)
    for source, names in (("vllm", _VLLM), ("sglang", _SGLANG)):
        if _total(samples, names["running"]) is None:
            continue
        usages = _values(samples, names["usage"])
        scraped = dict(source=source, num_running=int(_total(samples, names["running"])),
                       num_waiting=int(_total(samples, names["waiting"]) or 0),
                       kv_usage=max(usages) if usages else 0.0)
        if source == "vllm":
            scraped.update(prefix_hits=_total(samples, names["hits"]),
                           prefix_queries=_total(samples, names["queries"]))
            info = samples.get("vllm:cache_config_info")
            if info:
                labels = labels_of(info[0][0])
                scraped.update(num_total_blocks=_int(labels.get("num_gpu_blocks")),
                               block_size=_int(labels.get("block_size")))
        else:
            rates = _values(samples, names["hit_rate"])
            max_tokens = _total(samples, names["max_tokens"])
            scraped.update(prefix_hit_rate=rates[0] if rates else None,
                           num_total_blocks=int(max_tokens // DEFAULT_BLOCK_SIZE) if max_tokens else None)
        return Scraped(**scraped)
    return None


def load_report(instance_id: str, scraped: Scraped | None, now: float,
                in_flight_prompt_tokens: Sequence[int],
                unprefilled_prompt_tokens: Sequence[int] | None = None) -> LoadReport:
    """The backend's `LoadReport` from a scrape (None: no metrics, so only what the gateway has in flight).

    Waiting requests are assumed as long as the mean prompt the gateway has in
    flight there: the metrics count them but do not size them. Queued prefill:
    the prompts of `unprefilled_prompt_tokens` (the gateway's requests there
    that have had nothing back yet) when given, else the waiting requests'
    estimated prompts (a server prefilling in chunks counts a prompt whose
    prefill has begun as running, not waiting).
    """
    bs = (scraped.block_size if scraped else None) or DEFAULT_BLOCK_SIZE
    total = (scraped.num_total_blocks if scraped else None) or DEFAULT_NUM_BLOCKS
    mean_tokens = sum(in_flight_prompt_tokens) / len(in_flight_prompt_tokens) if in_flight_prompt_tokens else 0.0
    mean_blocks = math.ceil(mean_tokens / bs)
    if scraped is None:
        num_running, num_waiting = len(in_flight_prompt_tokens), 0
        used = min(total, sum(math.ceil(t / bs) for t in in_flight_prompt_tokens))
    else:
        num_running, num_waiting = scraped.num_running, scraped.num_waiting
        used = min(total, round(scraped.kv_usage * total))
    return LoadReport(
        instance_id=instance_id, time=now, num_running=num_running, num_waiting=num_waiting, num_preempted=0,
        num_used_blocks=used, num_free_blocks=total - used, num_total_blocks=total, block_size=bs,
        head_block_demand=mean_blocks if num_waiting else 0, waiting_block_demand=num_waiting * mean_blocks,
        num_pending_prefill_tokens=sum(unprefilled_prompt_tokens) if unprefilled_prompt_tokens is not None
        else round(num_waiting * mean_tokens))


def _values(samples: dict, names: Sequence[str]) -> list[float]:
    for name in names:
        if name in samples:
            return [v for _, v in samples[name]]
    return []


def _total(samples: dict, names: Sequence[str]) -> float | None:
    values = _values(samples, names)
    return sum(values) if values else None


def labels_of(text: str) -> dict[str, str]:
    """`a="1",b="2"` -> {"a": "1", "b": "2"}."""
    out = {}
    for part in text.split('",'):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip().strip('"')
    return out


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text not in (None, "", "None") else None
    except ValueError:
        return None
