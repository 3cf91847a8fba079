"""`shunter bench migration`: live migration between two real instances, beside its alternatives.

    shunter bench migration [--lengths 128,512,2048,8000] [--others 3] [--json PATH]

Instances of the built-in model as Ray actors (the serving runtime, no HTTP)
and the serving frontend's own migration driver. For each sequence length L,
a request with an L-token prompt decodes on instance 0 beside `--others` other
decoding requests, and is then migrated to instance 1, which reads the KV
straight from instance 0's shared-memory cache (the `shared-memory` channel,
the default on one machine):

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
- source slowdown: the source's steps while the migration runs, each over the
  mean step of the same batch outside it, as recorded by the source itself,
  pooled over `--repeats` live migrations per length; beside it the control,
  the same figure for windows of equal length just before each migration (how
  much steps vary with no migration).

The source runs on cores of its own (half of the machine's; the other
instances, this process and Ray on the rest), as an instance on its own device
would: then what slows its steps is the migration's own work in its process,
not other processes that share its cores on a small host. The destination
serves `--destination-others` decoding requests of its own meanwhile (default
none: the freest instance, which is where the pairing policies send work).

The same live and blocking migrations to a third instance whose cache is
private (`--kv-channel object-store`, Ray's object store: the channel across
machines by default) and to a fourth that takes the blocks over a gloo link
(`--kv-channel torch-distributed`) show what the choice of channel changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from shunter.errors import CLIError
from shunter.runtime.ray_instance import kv_channel
from shunter.sim.cli import HelpFormatter

DEFAULT_LENGTHS = "128,256,512,1024,2048,4096,8000"
# The channels measured beside shared memory (their keys in the JSON; instances 2 and 3 take them).
OTHER_CHANNELS = {"object_store": "the source sends its blocks through Ray's object store",
                  "torch_distributed": "the source sends its blocks over a gloo link"}


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("migration", help="live-migration downtime vs blocking copy and recompute",
                                    description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths (prompt tokens)")
    p.add_argument("--others", type=int, default=3,
                   help="other requests decoding on the source meanwhile")
    p.add_argument("--destination-others", type=int, default=0,
                   help="requests decoding on the destination meanwhile")
    p.add_argument("--repeats", type=int, default=5,
                   help="live shared-memory migrations per length; the source slowdown pools their steps")
    p.add_argument("--source-calls", default="other-cores", choices=["other-cores", "source-cores"],
                   help="where the source's threads that receive and answer calls (Ray's) run: on the other "
                        "cores, so that only its steps run on its own (as a GPU instance's steps lose nothing "
                        "to its CPU answering calls), or on the source's cores with its steps")
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
    if args.destination_others < 0:
        raise CLIError(f"--destination-others must be >= 0, got {args.destination_others}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    from shunter.runtime.spec import pin_process
    from shunter.server.cli import start_ray

    cores = sorted(os.sched_getaffinity(0))
    source_cores, other_cores = tuple(cores[:max(1, len(cores) // 2)]), tuple(cores[len(cores) // 2:])
    args.source_cores, args.other_cores = source_cores, other_cores
    pin_process(other_cores)  # before Ray starts: its processes inherit this
    try:
        start_ray(None)
        result = asyncio.run(_measure(lengths, args))
    finally:
        pin_process(tuple(cores))  # a caller in this process (a test) gets every core back
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
    # record_steps: the source's own step times give its slowdown during a migration.
    # The serving default step budget (512 tokens): with 2,048 one prefill chunk at 8,000 tokens of
    # context runs for over a minute on one core of an AMD EPYC host, past the health check.
    control = args.other_cores if args.source_calls == "other-cores" else None
    spec = InstanceSpec(model=source_path(source), dtype=args.dtype, num_threads=1, record_steps=True,
                        cpu_affinity=args.source_cores, control_cpu_affinity=control)
    frontend = Frontend(ray_handles, spec, build_policy("rr"), "bench", tokenizer.eos_token_id)
    await frontend.start(1)
    frontend.spec = beside = spec.replace(cpu_affinity=args.other_cores, control_cpu_affinity=None)
    await frontend.add_instance()
    # A third instance whose cache is private, as with `--kv-channel object-store`: migrations to it
    # take Ray's object store, so both channels are measured side by side.
    frontend.spec = beside.replace(kv_channel="object-store")
    await frontend.add_instance()
    # A fourth, as with `--kv-channel torch-distributed`: the source sends its blocks over gloo.
    frontend.spec = beside.replace(kv_channel="torch-distributed")
    await frontend.add_instance()
    expected = {"1": "shared-memory", "2": "object-store", "3": "torch-distributed"}
    channels = {i: kv_channel(frontend.get_handle("0"), frontend.get_handle(i)) for i in expected}
    if channels != expected:
        raise CLIError(f"expected a shared-memory, an object-store and a torch-distributed channel, got {channels}")
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(1000, min(vocab, 40000), n)]

    async def consume(stream, times: list[float]) -> None:
        async for event in frontend.events(stream):
            if event.token_ids:
                times.extend([time.monotonic()] * len(event.token_ids))

    def submit_on(instance_id: str, ids: list[int], max_tokens: int):
        # Round robin: throwaway dispatches to the other instances keep the next one on `instance_id`.
        while True:
            stream = frontend.submit(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            if stream.instance_id == instance_id:
                return stream
            frontend.abort(stream.request_id)

    live_stages = frontend.coordinator.config.max_stages
    # (mode, destination, stage limit, repeats): the live shared-memory migration is repeated so that
    # its source slowdown pools enough steps to be read against the control's noise.
    modes = (("live", "1", live_stages, args.repeats), ("blocking", "1", 1, 1),
             ("live_object_store", "2", live_stages, 1), ("blocking_object_store", "2", 1, 1),
             ("live_torch_distributed", "3", live_stages, 1), ("blocking_torch_distributed", "3", 1, 1))
    rows = []
    try:
        for length in lengths:
            row = {"length": length}
            # One prompt per length: after its first prefill the source's prefix cache holds it, so the
            # repeats start decoding at once (an 8,000-token prefill takes minutes on one core); the
            # migration copies every block of the request all the same.
            long_prompt = prompt(length)
            for mode, dst, max_stages, repeats in modes:
                frontend.coordinator.config.max_stages = max_stages
                downtimes, during, control = [], [], []
                for _ in range(repeats):
                    others = [submit_on("0", prompt(32), 4000) for _ in range(args.others)]
                    others += [submit_on(dst, prompt(32), 4000) for _ in range(args.destination_others)]
                    other_tasks = [asyncio.create_task(consume(s, [])) for s in others]
                    stream = submit_on("0", long_prompt, 4000)
                    times: list[float] = []
                    task = asyncio.create_task(consume(stream, times))
                    while len(times) < 24:  # prefilled, then a steady run of decode steps
                        await asyncio.sleep(0.01)
                    began = time.monotonic()
                    m = await frontend.migrate(stream.request_id, dst)
                    if m.outcome != "committed":
                        raise CLIError(f"the {mode} migration at length {length} aborted: {m.abort_reason}")
                    await asyncio.sleep(0.5)  # tokens from the destination; the source's steps without it
                    downtimes.append(m.downtime * 1000)
                    steps = await frontend.get_handle("0").recorded_steps()
                    d, c = source_step_ratios(steps, m, args.others + 1, since=times[4])
                    during += d
                    control += c
                    if mode == "live" and "decode_step_ms" not in row:
                        before = [b - a for a, b in zip(times[4:], times[5:]) if b <= began]
                        row["decode_step_ms"] = statistics.median(before) * 1000
                        row["stages"] = m.num_stages
                        row["blocks_per_stage"] = m.blocks_per_stage
                        # What the client sees: the longest pause between two of its tokens across the move.
                        row["max_gap_ms"] = max((b - a for a, b in zip(times, times[1:]) if b >= began),
                                                default=0) * 1000
                    for s in [stream, *others]:
                        frontend.abort(s.request_id)
                    for t in [task, *other_tasks]:
                        await asyncio.wait_for(t, 30)
                row[f"{mode}_downtime_ms"] = statistics.median(downtimes)
                row[f"{mode}_downtime_max_ms"] = max(downtimes)
                row[f"{mode}_source_slowdown"] = statistics.mean(during) if during else None
                row[f"{mode}_source_control"] = statistics.mean(control) if control else None
                row[f"{mode}_source_steps"] = len(during)
            frontend.coordinator.config.max_stages = live_stages
            # Recompute: the same length prefilled from scratch on the (now idle) destination.
            fresh = submit_on("1", prompt(length), 1)
            t0 = time.monotonic()
            async for _ in frontend.events(fresh):
                pass
            row["recompute_ms"] = (time.monotonic() - t0) * 1000
            rows.append(row)
            print(f"  length {length}: downtime {row['live_downtime_ms']:.1f} ms, blocking copy "
                  f"{row['blocking_downtime_ms']:.1f} ms (object store: {row['blocking_object_store_downtime_ms']:.1f} "
                  f"ms, gloo: {row['blocking_torch_distributed_downtime_ms']:.1f} ms), recompute "
                  f"{row['recompute_ms']:.0f} ms, decode step {row['decode_step_ms']:.1f} ms, "
                  f"source slowdown {_percent(row['live_source_slowdown'])} (control "
                  f"{_percent(row['live_source_control'])}, {row['live_source_steps']} steps)",
                  flush=True)
    finally:
        await frontend.shutdown()
    return {
        "lengths": [r["length"] for r in rows],
        "downtime_ms": [r["live_downtime_ms"] for r in rows],
        "downtime_max_ms": [r["live_downtime_max_ms"] for r in rows],
        "blocking_copy_ms": [r["blocking_downtime_ms"] for r in rows],
        "recompute_ms": [r["recompute_ms"] for r in rows],
        "decode_step_ms": [r["decode_step_ms"] for r in rows],
        "source_slowdown": [r["live_source_slowdown"] for r in rows],
        "source_slowdown_control": [r["live_source_control"] for r in rows],
        "source_slowdown_steps": [r["live_source_steps"] for r in rows],
        "max_gap_ms": [r["max_gap_ms"] for r in rows],
        "stages": [r["stages"] for r in rows],
        "blocks_per_stage": [r["blocks_per_stage"] for r in rows],
        # The same through Ray's object store and over gloo, for the choice of channel.
        **{name: {"downtime_ms": [r[f"live_{name}_downtime_ms"] for r in rows],
                  "blocking_copy_ms": [r[f"blocking_{name}_downtime_ms"] for r in rows],
                  "source_slowdown": [r[f"live_{name}_source_slowdown"] for r in rows],
                  "source_slowdown_control": [r[f"live_{name}_source_control"] for r in rows]}
           for name in OTHER_CHANNELS},
        "others": args.others,
        "destination_others": args.destination_others,
        "repeats": args.repeats,
        "source_cores": list(args.source_cores),
        "other_cores": list(args.other_cores),
        "source_calls": args.source_calls,
    }


def source_step_ratios(steps: list, m, num_decodes: int, since: float) -> tuple[list[float], list[float]]:
    """How much slower the source's steps were while migration `m` ran: each step's seconds over the
    mean of its batch's baseline (1.0: not at all); and the same ratios for a window of equal
    length just before it (the control: how much steps vary with no migration at all).

    Each step of the source that ended in a window is compared with the mean step of the same
    batch outside it: `num_decodes` decodes (the migrating request and the others) from `since` to
    the window, one fewer after the final stage suspended the request there. The mean, not the
    median: the caller averages the ratios, and step times are skewed to the right, so a median
    baseline would read a slowdown into identical steps. Steps with a prefill are left out; so is a
    batch with no baseline. The caller pools the ratios of several migrations.
    """
    def batch(n: int, lo: float, hi: float) -> list[float]:
        return [s.seconds for s in steps if not s.prefill and s.num_decodes == n and lo < s.ended_at <= hi]

    # A step ends after the suspension answer only if it ran without the request: the "after" baseline.
    during = _ratios(steps, m.start_time, m.end_time, {
        num_decodes: batch(num_decodes, since, m.start_time),
        num_decodes - 1: batch(num_decodes - 1, m.end_time, float("inf"))})
    control_start = m.start_time - (m.end_time - m.start_time)
    control = _ratios(steps, control_start, m.start_time, {num_decodes: batch(num_decodes, since, control_start)})
    return during, control


def _ratios(steps: list, lo: float, hi: float, baselines: dict[int, list[float]]) -> list[float]:
    """(a step's seconds / the mean of its batch's baseline) for the steps ended in (lo, hi]."""
    return [s.seconds / statistics.fmean(baselines[s.num_decodes]) for s in steps
            if not s.prefill and lo < s.ended_at <= hi and baselines.get(s.num_decodes)]


def _print(r: dict) -> None:
    print(f"shunter bench migration: Ray-actor instances of the built-in model (1 thread each), "
          f"{r['others']} other requests decoding on the source (cores {r['source_cores']}; the threads "
          f"answering its calls on {'the other cores' if r['source_calls'] == 'other-cores' else 'the same'}), "
          f"{r['destination_others']} on the destination (cores {r['other_cores']}, with this process and Ray); "
          f"source slowdown pooled over {r['repeats']} live shared-memory migrations per length")
    print("channel shared-memory (the destination reads the source's cache):")
    _print_channel(r["lengths"], r)
    # The client's gaps and the repeats: measured on shared memory only.
    other = {k: v for k, v in r.items() if k not in ("max_gap_ms", "downtime_max_ms")}
    for name, how in OTHER_CHANNELS.items():
        print(f"channel {name.replace('_', '-')} ({how}):")
        _print_channel(r["lengths"], {**other, **r[name]})


def _print_channel(lengths: list[int], r: dict) -> None:
    print(f"  {'length':>7} {'downtime':>10} {'blocking copy':>14} {'recompute':>10} {'decode step':>12} "
          f"{'recompute/downtime':>19} {'source slowdown':>16} {'(control)':>10}"
          + (f" {'max gap':>9} {'worst downtime':>15}" if "max_gap_ms" in r else ""))

    for i, n in enumerate(lengths):
        print(f"  {n:>7} {r['downtime_ms'][i]:>8.1f}ms {r['blocking_copy_ms'][i]:>12.1f}ms "
              f"{r['recompute_ms'][i]:>8.0f}ms {r['decode_step_ms'][i]:>10.1f}ms "
              f"{r['recompute_ms'][i] / r['downtime_ms'][i]:>18.1f}x "
              f"{_percent(r['source_slowdown'][i]):>16} {_percent(r['source_slowdown_control'][i]):>10}"
              + (f" {r['max_gap_ms'][i]:>7.1f}ms {r['downtime_max_ms'][i]:>13.1f}ms" if "max_gap_ms" in r else ""))


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.1f} %"
