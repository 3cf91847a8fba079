"""`shunter bench migration`: live migration between two real instances, beside its alternatives.

    shunter bench migration [--lengths 128,512,2048,8000] [--others 3] [--json PATH]

Two instances of the built-in model as Ray actors (the serving runtime, no
HTTP) and the serving frontend's own migration driver. For each sequence
length L, a request with an L-token prompt decodes on instance 0 beside
`--others` other decoding requests, and is then migrated to instance 1:

- downtime: the migration's final stage, from the source's answer to the
  suspension (its last step there has ended) to the destination's import (the
  time it made no progress);
- max gap: the longest pause between two of the request's tokens as the
  client receives them, across the move (a decode step on each side included);
- blocking copy: the same migration as one stop-and-copy stage (the whole KV
  copied while the request waits: its downtime);
- recompute: prefilling a fresh L-token prompt on the idle destination
  (what a migration without KV would cost);
- decode step: the source's median time between two tokens of the request
  before the migration;
- source slowdown: the other requests' mean gap between tokens on the source
  while the migration runs, over their mean gap before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from shunter.errors import CLIError
from shunter.sim.cli import HelpFormatter

DEFAULT_LENGTHS = "128,256,512,1024,2048,4096,8000"


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("migration", help="live-migration downtime vs blocking copy and recompute",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths (prompt tokens)")
    p.add_argument("--others", type=int, default=3, help="other requests decoding on the source meanwhile")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the figures here")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 16:
        raise CLIError(f"--lengths must name lengths of at least 16 tokens, got {args.lengths!r}")
    if args.others < 0:
        raise CLIError(f"--others must be >= 0, got {args.others}")
    from shunter.server.cli import start_ray

    start_ray(None)
    result = asyncio.run(_measure(lengths, args))
    _print(result)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0


async def _measure(lengths: list[int], args) -> dict:
    import numpy as np

    from shunter.cluster.bundles import build_policy
    from shunter.model.loader import load_tokenizer_and_context, prepare_checkpoint, source_path
    from shunter.request import SamplingParams
    from shunter.runtime.spec import InstanceSpec
    from shunter.server.frontend import Frontend
    from shunter.server.runner import ray_handles

    source = prepare_checkpoint(None)
    tokenizer, model_len = load_tokenizer_and_context(source)
    if max(lengths) + 64 > model_len:
        raise CLIError(f"the longest length {max(lengths)} leaves no room to decode in the model's "
                       f"context of {model_len} tokens")
    spec = InstanceSpec(model=source_path(source), dtype=args.dtype, num_threads=1, max_num_batched_tokens=2048)
    frontend = Frontend(ray_handles, spec, build_policy("rr"), "bench", tokenizer.eos_token_id)
    await frontend.start(2)
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(1000, min(vocab, 40000), n)]

    async def consume(stream, times: list[float]) -> None:
        async for event in frontend.events(stream):
            if event.token_ids:
                times.extend([time.monotonic()] * len(event.token_ids))

    def submit_on(instance_id: str, ids: list[int], max_tokens: int):
        # Round robin over two instances: a throwaway dispatch to the other one keeps the next on `instance_id`.
        while True:
            stream = frontend.submit(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            if stream.instance_id == instance_id:
                return stream
            frontend.abort(stream.request_id)

    rows = []
    try:
        for length in lengths:
            row = {"length": length}
            for mode, max_stages in (("live", frontend.coordinator.config.max_stages), ("blocking", 1)):
                frontend.coordinator.config.max_stages = max_stages
                others = [submit_on("0", prompt(32), 4000) for _ in range(args.others)]
                other_times = [[] for _ in others]
                other_tasks = [asyncio.create_task(consume(s, t)) for s, t in zip(others, other_times)]
                stream = submit_on("0", prompt(length), 4000)
                times: list[float] = []
                task = asyncio.create_task(consume(stream, times))
                while len(times) < 24:  # prefilled, then a steady run of decode steps
                    await asyncio.sleep(0.01)
                began = time.monotonic()
                m = await frontend.migrate(stream.request_id, "1")
                ended = time.monotonic()
                if m.outcome != "committed":
                    raise CLIError(f"the {mode} migration at length {length} aborted: {m.abort_reason}")
                await asyncio.sleep(0.3)  # tokens from the destination
                row[f"{mode}_downtime_ms"] = m.downtime * 1000
                if mode == "live":
                    before = [b - a for a, b in zip(times[4:], times[5:]) if b <= began]
                    row["decode_step_ms"] = statistics.median(before) * 1000
                    row["stages"] = m.num_stages
                    row["blocks_per_stage"] = m.blocks_per_stage
                    # Before: once the request decodes (its long prefill slows everybody's steps).
                    row["source_slowdown"] = _slowdown(other_times, times[4], began, ended)
                    # What the client sees: the longest pause between two of its tokens across the move.
                    row["max_gap_ms"] = max((b - a for a, b in zip(times, times[1:]) if b >= began), default=0) * 1000
                for s in [stream, *others]:
                    frontend.abort(s.request_id)
                for t in [task, *other_tasks]:
                    await asyncio.wait_for(t, 30)
            frontend.coordinator.config.max_stages = 8
            # Recompute: the same length prefilled from scratch on the (now idle) destination.
            fresh = submit_on("1", prompt(length), 1)
            t0 = time.monotonic()
            async for _ in frontend.events(fresh):
                pass
            row["recompute_ms"] = (time.monotonic() - t0) * 1000
            rows.append(row)
            print(f"  length {length}: downtime {row['live_downtime_ms']:.1f} ms, blocking copy "
                  f"{row['blocking_downtime_ms']:.1f} ms, recompute {row['recompute_ms']:.0f} ms, decode step "
                  f"{row['decode_step_ms']:.1f} ms", flush=True)
    finally:
        await frontend.shutdown()
    return {
        "lengths": [r["length"] for r in rows],
        "downtime_ms": [r["live_downtime_ms"] for r in rows],
        "blocking_copy_ms": [r["blocking_downtime_ms"] for r in rows],
        "recompute_ms": [r["recompute_ms"] for r in rows],
        "decode_step_ms": [r["decode_step_ms"] for r in rows],
        "source_slowdown": [r["source_slowdown"] for r in rows],
        "max_gap_ms": [r["max_gap_ms"] for r in rows],
        "stages": [r["stages"] for r in rows],
        "blocks_per_stage": [r["blocks_per_stage"] for r in rows],
        "others": args.others,
    }


def _slowdown(times_per_request: list[list[float]], since: float, began: float, ended: float) -> float | None:
    """Mean token gap of the other requests during [began, ended] over their mean gap in [since, began)."""
    before, during = [], []
    for times in times_per_request:
        for a, b in zip(times, times[1:]):
            if since <= a and b < began:
                before.append(b - a)
            elif a >= began and b <= ended + 0.05:
                during.append(b - a)
    if not before or not during:
        return None
    return statistics.mean(during) / statistics.mean(before)


def _print(r: dict) -> None:
    print(f"shunter bench migration: two Ray-actor instances of the built-in model (1 thread each), "
          f"{r['others']} other requests decoding on the source")
    print(f"  {'length':>7} {'downtime':>10} {'blocking copy':>14} {'recompute':>10} {'decode step':>12} "
          f"{'recompute/downtime':>19} {'source slowdown':>16} {'max gap':>9}")
    for i, n in enumerate(r["lengths"]):
        slow = r["source_slowdown"][i]
        print(f"  {n:>7} {r['downtime_ms'][i]:>8.1f}ms {r['blocking_copy_ms'][i]:>12.1f}ms "
              f"{r['recompute_ms'][i]:>8.0f}ms {r['decode_step_ms'][i]:>10.1f}ms "
              f"{r['recompute_ms'][i] / r['downtime_ms'][i]:>18.1f}x "
              f"{'-' if slow is None else f'{(slow - 1) * 100:+.1f} %':>16} {r['max_gap_ms'][i]:>7.1f}ms")
