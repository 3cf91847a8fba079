"""`shunter simulate`: replay a trace on simulated instances running the real scheduling code.

    shunter simulate --trace azure2023_conv --instances 4 --hardware a100-80gb --model llama-2-7b \\
        --policy llumnix --duration 600 --json out.json --plot out.png
    shunter simulate --trace azure2023_code --hardware a10 --policy llumnix --autoscale 1:16
    shunter simulate --trace azure2023_conv --pd 2:6 --policy llumnix    # prefill/decode disaggregation
    shunter simulate --list

Heavy imports (numpy, the simulator) happen inside the handler so `shunter --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

from shunter.cluster.scaling import (
    DEFAULT_SCALE_DOWN_FREENESS, DEFAULT_SCALE_UP_FREENESS, DEFAULT_STARTUP_DELAY, SCALING,
)
from shunter.errors import one_line_error

DEFAULT_HARDWARE = "a100-80gb"
DEFAULT_MODEL = "llama-2-7b"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False) whose help already says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate a cluster on a trace (discrete-event, same scheduler as serving)",
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--list", action="store_true", help="list traces, hardware, models, policies and latency models")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", default="azure2023_conv", help="built-in trace name or a trace file path")
    w.add_argument("--start", type=float, default=0.0, help="window start, seconds of the trace's clock")
    w.add_argument("--duration", type=float, default=None, help="window length in seconds (default: to the end)")
    rate = w.add_mutually_exclusive_group()
    rate.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate by this")
    rate.add_argument("--rate", type=float, default=None, help="rescale arrivals to this many requests/s")
    w.add_argument("--max-requests", type=int, default=None, help="keep only the first N requests of the window")
    w.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    w.add_argument("--priority-fraction", type=float, default=0.0, help="fraction of requests with high priority")
    w.add_argument("--ttft-slo", type=float, default=None, help="time-to-first-token objective, seconds")
    w.add_argument("--tpot-slo", type=float, default=None, help="time-per-output-token objective, seconds")
    c = p.add_argument_group("cluster")
    c.add_argument("--instances", type=int, default=None,
                   help="number of instances (default 1; with --autoscale, at the start, default MIN; "
                        "with --pd, P + D)")
    c.add_argument("--pd", default=None, metavar="P:D",
                   help="prefill/decode disaggregation: P prefill and D decode instances; each request prefills on a "
                        "prefill instance and migrates to a decode instance (the dispatch policy's pick) after its "
                        "first token (not with --autoscale)")
    c.add_argument("--hardware", default=None, help=f"GPU of each instance (roofline; default {DEFAULT_HARDWARE})")
    c.add_argument("--model", default=None,
                   help=f"model, optionally with -tpN (default {DEFAULT_MODEL}; profiled: the profile's model)")
    pol = p.add_argument_group("cluster policies (a bundle; the flags below override its parts)")
    pol.add_argument("--policy", default="infaas", help="policy bundle: dispatch + migration")
    pol.add_argument("--dispatch", default=None, help="dispatch policy (overrides the bundle's)")
    pol.add_argument("--migration", default=None, help="migration pairing policy, or none (overrides the bundle's)")
    pol.add_argument("--selection", default=None, help="which request a migration source sends")
    pol.add_argument("--src-freeness", type=float, default=None, help="freeness below which an instance sheds load")
    pol.add_argument("--dst-freeness", type=float, default=None, help="freeness above which an instance takes load")
    pol.add_argument("--max-migrations-per-instance", type=int, default=None,
                     help="migrations in flight per instance at most")
    pol.add_argument("--priority-headroom", type=int, default=0,
                     help="KV blocks of headroom that high-priority requests add to their instance's virtual usage")
    pol.add_argument("--control-interval", type=float, default=0.05,
                     help="seconds between load reports / migration decisions (0: the dispatcher reads exact "
                          "load at every arrival and no migration policy runs)")
    pol.add_argument("--link", default=None, help="link that migrations copy KV over (default eth-100g)")
    sc = p.add_argument_group("autoscaling (the cluster's freeness: decode steps left per request, memory pooled)")
    sc.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                    help="add and drain instances, keeping between MIN and MAX (default: a fixed --instances)")
    sc.add_argument("--scaling-policy", default=None, metavar="NAME",
                    help="the scaling policy: " + ", ".join(SCALING.names()) + " (default: shunter with --policy shunter, else freeness)")
    sc.add_argument("--scale-up-freeness", type=float, default=None,
                    help=f"add instances when the freeness stays below this (default {DEFAULT_SCALE_UP_FREENESS:g})")
    sc.add_argument("--scale-down-freeness", type=float, default=None,
                    help=f"drain one when the freeness without it stays above this "
                         f"(default {DEFAULT_SCALE_DOWN_FREENESS:g})")
    sc.add_argument("--startup-delay", type=float, default=None,
                    help=f"seconds from ordering an instance until it serves, paid for meanwhile "
                         f"(default {DEFAULT_STARTUP_DELAY:g})")
    c.add_argument("--latency-model", default="roofline", help="how step durations are predicted")
    c.add_argument("--profile", default=None, help="profile JSON for --latency-model profiled")
    c.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    c.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks per instance (default: what the latency model's memory implies)")
    c.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    c.add_argument("--max-num-seqs", type=int, default=256, help="most running requests per instance")
    c.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    c.add_argument("--prefix-caching", choices=("auto", "on", "off"), default="auto",
                   help="auto: the results of 'on' at the cost of 'off' where they provably agree "
                        "(no shared prompts, no preemption; see docs/simulator.md)")
    o = p.add_argument_group("run and output")
    o.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the JSON report here")
    o.add_argument("--plot", dest="plot_path", default=None, metavar="PATH", help="write latency CDFs and load plots here")
    o.add_argument("--goodput", action="store_true",
                   help="also search the highest rate meeting both SLOs for 90%% of requests (re-runs the simulation)")
    o.add_argument("--debug", action="store_true", help="check engine invariants after every step (slow)")
    o.add_argument("--no-fast-path", action="store_true", help="drive every engine step through the event queue")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_simulate)
    p.error = one_line_error


def print_listing() -> None:
    from shunter.cluster.policies import catalog
    from shunter.sim.hardware import HARDWARE
    from shunter.sim.latency import LATENCY_MODELS
    from shunter.sim.models import MODELS
    from shunter.sim.workloads import list_traces

    print("traces:              " + ", ".join(list_traces()) + " (or a trace file path)")
    print("hardware:")
    for name, gpu in HARDWARE.items():
        print(f"  {name:<11} {gpu.peak_flops / 1e12:6.0f} TFLOP/s bf16  {gpu.memory_bandwidth / 1e9:5.0f} GB/s  "
              f"{gpu.memory_bytes / 2**30:5.1f} GiB")
    print("models:              " + ", ".join(MODELS.names()) + " (append -tpN for tensor parallelism)")
    for title, registry in catalog().items():
        print(f"{title + ':':<21}" + ", ".join(registry.listing()))
    print("latency models:      " + ", ".join(LATENCY_MODELS.names()))


def run_simulate(args: argparse.Namespace) -> int:
    if args.list:
        print_listing()
        return 0

    import dataclasses
    import time

    from shunter.cluster.disaggregation import parse_pd
    from shunter.cluster.load import LoadConfig
    from shunter.cluster.policies import LINKS, build_policy
    from shunter.config import SchedulerConfig
    from shunter.sim.latency import LATENCY_MODELS, build_latency_model
    from shunter.cluster.migration import DEFAULT_LINK, MigrationConfig
    from shunter.sim.models import get_model
    from shunter.sim.report import (
        arrival_rate, build_report, format_summary, plot_report, scale_arrivals, search_goodput,
    )
    from shunter.sim.simulator import SimConfig
    from shunter.sim.simulator import simulate as simulate_once
    from shunter.sim.workloads import WorkloadSpec, load_workload_with_clipping

    if args.instances is not None and args.instances < 1:
        raise ValueError(f"--instances must be at least 1, got {args.instances}")
    pd = parse_pd(args.pd, instances=args.instances, autoscale=args.autoscale)
    scaling = scaling_config(args)
    num_instances = pd.num_instances if pd is not None else args.instances or (scaling.min_instances if scaling else 1)
    if args.goodput and scaling is not None:
        raise ValueError("--goodput rates a fixed number of GPUs; drop --autoscale")
    if args.control_interval < 0:
        raise ValueError(f"--control-interval must be >= 0 seconds, got {args.control_interval}")
    if args.priority_headroom < 0:
        raise ValueError(f"--priority-headroom must be >= 0 blocks, got {args.priority_headroom}")
    policy = build_policy(args.policy, dispatch=args.dispatch, migration=args.migration, selection=args.selection,
                          src_freeness=args.src_freeness, dst_freeness=args.dst_freeness,
                          max_per_instance=args.max_migrations_per_instance,
                          load=LoadConfig({1: args.priority_headroom}) if args.priority_headroom else None,
                          scaling=scaling)
    link = args.link or DEFAULT_LINK
    bandwidth = LINKS.get(link)
    LATENCY_MODELS.get(args.latency_model)
    if args.goodput and args.ttft_slo is None and args.tpot_slo is None:
        raise ValueError("--goodput needs --ttft-slo and/or --tpot-slo")

    hardware = args.hardware or DEFAULT_HARDWARE
    latency = build_latency_model(args.latency_model, hardware=hardware, model=args.model or DEFAULT_MODEL,
                                  profile=args.profile)
    if args.model is not None or args.latency_model == "roofline":
        model = get_model(args.model or DEFAULT_MODEL)
    else:  # the profiled engine's model, when the catalog knows it (for the context length and KV bytes)
        model = _catalog_model(getattr(latency, "metadata", {}).get("model"))
    max_model_len = args.max_model_len or (model.max_model_len if model else 4096)

    spec = WorkloadSpec(args.trace, start=args.start, duration=args.duration, rate_scale=args.rate_scale,
                        rate=args.rate, max_requests=args.max_requests, max_model_len=max_model_len, seed=args.seed,
                        priority_fraction=args.priority_fraction, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo)
    num_blocks = args.num_blocks or latency.kv_capacity_blocks(args.block_size, args.max_num_batched_tokens)
    if num_blocks is None:
        raise ValueError(f"latency model {args.latency_model} implies no KV capacity; give --num-blocks")
    workload, clipping = load_workload_with_clipping(spec)
    notice = clipping.summary(len(workload))
    if notice:  # a trace written for a longer context can lose most of its prompts; never silently
        print(f"shunter: note: {notice}", file=sys.stderr)
    scheduler = SchedulerConfig(num_blocks=num_blocks, block_size=args.block_size,
                                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                max_model_len=max_model_len)
    span = workload[-1].arrival_time - workload[0].arrival_time
    config = SimConfig(
        num_instances=num_instances, scheduler=scheduler, policy=policy,
        fast_path=not args.no_fast_path, debug=args.debug,
        control_interval=args.control_interval or None,
        load_sample_interval=max(span / 300, 0.01) if args.plot_path else None,
        gpus_per_instance=model.tp if model and args.latency_model == "roofline" else 1,
        migration=MigrationConfig(bandwidth_bytes_per_s=bandwidth,
                                  kv_bytes_per_block=model.kv_bytes_per_block(args.block_size) if model else 0),
        seed=args.seed, pd=pd,
    )

    def simulate(requests, show_progress: bool):
        bar = None
        if show_progress and not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(requests), unit="req", desc="simulating", leave=False)
        try:
            return simulate_once(config, latency, requests, prefix_caching=args.prefix_caching,
                                 progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()

    t0 = time.perf_counter()
    result = simulate(workload, True)
    wall = time.perf_counter() - t0

    goodput = None
    if args.goodput:
        from shunter.sim.metrics import slo_attainment

        base_rate = arrival_rate(workload)

        def attainment_at(scale: float) -> float:
            r = result if scale == 1.0 else simulate(scale_arrivals(workload, scale), False)
            return slo_attainment(r.records, len(r.rejected) + len(r.unfinished)) or 0.0

        scale, tried = search_goodput(attainment_at)
        num_gpus = num_instances * config.gpus_per_instance
        goodput = {"rate": base_rate * scale, "rate_per_gpu": base_rate * scale / num_gpus, "rate_scale": scale,
                   "slo_attainment": dict(tried).get(scale),
                   "searched": [{"rate_scale": s, "rate": base_rate * s, "slo_attainment": a} for s, a in tried]}

    run_config = {
        "trace": args.trace, "start": args.start, "duration": args.duration, "rate_scale": args.rate_scale,
        "rate": args.rate, "max_requests": args.max_requests, "seed": args.seed,
        "priority_fraction": args.priority_fraction, "ttft_slo": args.ttft_slo, "tpot_slo": args.tpot_slo,
        "instances": num_instances, "pd": str(pd) if pd is not None else None,
        "autoscale": args.autoscale, "hardware": hardware if args.latency_model == "roofline" else None,
        "model": model.name if model else None, "policy": args.policy, "policies": policy.to_json(),
        "control_interval": args.control_interval, "link": link,
        "latency_model": latency.describe(),
        "scheduler": dataclasses.asdict(dataclasses.replace(scheduler, enable_prefix_caching=result.prefix_caching)),
        "prefix_caching": args.prefix_caching, "fast_path": config.fast_path,
        "clipping": dataclasses.asdict(clipping),
    }
    report = build_report(result, len(workload), config=run_config, wall_seconds=wall, goodput=goodput)
    print(format_summary(report))
    if args.json_path:
        import json

        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot_path:
        plot_report(result, args.plot_path)
    return 0


def scaling_config(args: argparse.Namespace):
    """The `ScalingConfig` of `--autoscale MIN:MAX` and its flags (None without it); ValueError naming a bad value."""
    from shunter.cluster.scaling import ScalingConfig

    flags = {"--scale-up-freeness": args.scale_up_freeness, "--scale-down-freeness": args.scale_down_freeness,
             "--startup-delay": args.startup_delay, "--scaling-policy": args.scaling_policy}
    if args.autoscale is None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]} needs --autoscale MIN:MAX")
        return None
    parts = args.autoscale.split(":")
    try:
        low, high = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX, two whole numbers, got {args.autoscale!r}") from None
    if low < 1:
        raise ValueError(f"--autoscale {args.autoscale}: MIN must be at least 1")
    if low > high:
        raise ValueError(f"--autoscale {args.autoscale}: MIN must not exceed MAX")
    if args.instances is not None and not low <= args.instances <= high:
        raise ValueError(f"--instances {args.instances} lies outside --autoscale {args.autoscale}")
    if args.startup_delay is not None and not args.startup_delay >= 0:
        raise ValueError(f"--startup-delay must be >= 0 seconds, got {args.startup_delay}")
    up = DEFAULT_SCALE_UP_FREENESS if args.scale_up_freeness is None else args.scale_up_freeness
    down = DEFAULT_SCALE_DOWN_FREENESS if args.scale_down_freeness is None else args.scale_down_freeness
    if not down > up:
        raise ValueError(f"--scale-down-freeness ({down:g}) must exceed --scale-up-freeness ({up:g})")
    # Without --scaling-policy, Shunter's bundle scales with Shunter's policy, the others with Llumnix-style freeness.
    default_policy = "shunter" if args.policy == "shunter" else "freeness"
    return ScalingConfig(min_instances=low, max_instances=high, policy=args.scaling_policy or default_policy,
                         scale_up_freeness=up, scale_down_freeness=down,
                         startup_delay=DEFAULT_STARTUP_DELAY if args.startup_delay is None else args.startup_delay)


def _catalog_model(name: object):
    from shunter.sim.models import get_model

    if not isinstance(name, str):
        return None
    try:
        return get_model(name)
    except ValueError:
        return None
