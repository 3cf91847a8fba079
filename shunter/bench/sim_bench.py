"""`shunter bench sim`: how many requests per wall second the simulator replays.

Workload: the first 10,000 requests of azure2023_conv at the trace's own rate on
16 a100-80gb instances serving llama-2-7b, roofline latency, least-load
dispatch — the setting the simulator issue names. The figure is simulated
requests per wall second of `Simulator.run` (trace loading excluded, request
construction and dispatch included), printed next to an in-run baseline (the
same simulator stepping one event per engine step) and the reference figures
the issue quotes for other simulators on this machine, which this command does
not measure.
"""

from __future__ import annotations

import argparse

from shunter.sim.cli import HelpFormatter

# Reference values quoted in the simulator issue (same workload, this 2-core machine): constants, not measured here.
VIDUR_REQUESTS_PER_S = 355.0
DISTSERVE_REQUESTS_PER_S = 600.0
TARGET_REQUESTS_PER_S = 2500.0  # issue 7: with --policy llumnix, on every host of this class
REFERENCE_SOURCE = "vidur/distserve figures: reference values quoted in the simulator issue, not measured here"


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("sim", help="simulator speed: simulated requests per wall second",
                                    formatter_class=HelpFormatter)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write {\"requests_per_s\": ...} here")
    p.add_argument("--requests", type=int, default=10_000, help="requests of the trace to replay")
    p.add_argument("--instances", type=int, default=16, help="simulated instances")
    p.add_argument("--trace", default="azure2023_conv", help="trace to replay")
    p.add_argument("--policy", default="infaas", help="policy bundle (shunter simulate --list)")
    p.add_argument("--control-interval", type=float, default=0.05, help="seconds between load reports")
    p.add_argument("--no-fast-path", action="store_true", help="measure the step-by-step event loop instead")
    p.add_argument("--repeat", type=int, default=1, help="runs; the best is reported")
    p.add_argument("--baseline-requests", type=int, default=1000,
                   help="requests for the in-run baseline: the same simulator stepping one event per engine step "
                        "(0 skips it)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import time

    from shunter.cluster.bundles import build_policy
    from shunter.config import SchedulerConfig
    from shunter.sim.latency import RooflineLatency
    from shunter.sim.hardware import get_gpu
    from shunter.sim.models import get_model
    from shunter.sim.simulator import SimConfig, simulate
    from shunter.sim.workloads import WorkloadSpec, load_workload

    if args.requests < 1 or args.instances < 1 or args.repeat < 1 or args.baseline_requests < 0:
        raise ValueError("--requests, --instances and --repeat must be positive, --baseline-requests not negative")
    model = get_model("llama-2-7b")
    latency = RooflineLatency(get_gpu("a100-80gb"), model)
    block_size, budget = 16, 2048
    workload = load_workload(WorkloadSpec(args.trace, max_requests=args.requests, max_model_len=model.max_model_len))
    scheduler = SchedulerConfig(num_blocks=latency.kv_capacity_blocks(block_size, budget), block_size=block_size,
                                max_num_batched_tokens=budget, max_num_seqs=256, max_model_len=model.max_model_len)
    if not args.control_interval > 0:
        raise ValueError(f"--control-interval must be > 0 seconds, got {args.control_interval}")
    config = SimConfig(num_instances=args.instances, scheduler=scheduler, policy=build_policy(args.policy),
                       fast_path=not args.no_fast_path, control_interval=args.control_interval)
    best = float("inf")
    result = None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = simulate(config, latency, workload, prefix_caching="auto")
        best = min(best, time.perf_counter() - t0)
    rate = len(workload) / best
    baseline_rate = None
    if args.baseline_requests and not args.no_fast_path:
        # Measured in this run: the step-by-step event loop, on a prefix of the same workload.
        subset = workload[:args.baseline_requests]
        t0 = time.perf_counter()
        simulate(dataclasses.replace(config, fast_path=False), latency, subset, prefix_caching="auto")
        baseline_rate = len(subset) / (time.perf_counter() - t0)
    steps = sum(result.instance_num_steps.values())
    num_migrations = sum(1 for m in result.migrations if m.outcome == "committed")
    print(f"shunter bench sim: {len(workload):,} requests of {args.trace} on {args.instances} a100-80gb instances "
          f"(llama-2-7b, roofline, policy {args.policy}, control interval {args.control_interval} s, fast path {'off' if args.no_fast_path else 'on'}, "
          f"prefix caching auto -> {'on' if result.prefix_caching else 'off'})")
    print(f"  requests_per_s  {rate:,.0f}   ({best:.2f} s wall; {steps:,} engine steps, "
          f"{steps / best:,.0f} steps/s; {len(result.records):,} finished, "
          f"{num_migrations:,} migrations)")
    if baseline_rate is not None:
        print(f"  in-run baseline {baseline_rate:,.0f} req/s: one event per engine step, first {args.baseline_requests:,} "
              f"requests (ratio x{rate / baseline_rate:.1f})")
    print(f"  reference       (quoted in the simulator issue, not measured here) "
          f"Vidur ~{VIDUR_REQUESTS_PER_S:.0f} req/s (x{rate / VIDUR_REQUESTS_PER_S:.1f}), "
          f"DistServe's simulator ~{DISTSERVE_REQUESTS_PER_S:.0f} req/s (x{rate / DISTSERVE_REQUESTS_PER_S:.1f}); "
          f"target {TARGET_REQUESTS_PER_S:,.0f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"requests_per_s": rate, "wall_seconds": best, "requests": len(workload),
                       "instances": args.instances, "engine_steps": steps, "fast_path": not args.no_fast_path,
                       "vidur_requests_per_s": VIDUR_REQUESTS_PER_S, "ratio_to_vidur": rate / VIDUR_REQUESTS_PER_S,
                       "distserve_requests_per_s": DISTSERVE_REQUESTS_PER_S,
                       "reference_source": REFERENCE_SOURCE,
                       "step_by_step_requests_per_s": baseline_rate,
                       "ratio_to_step_by_step": None if baseline_rate is None else rate / baseline_rate}, f, indent=1)
            f.write("\n")
    return 0
