"""`shunter bench fidelity`: does the simulator reproduce the real engine's latencies?

One bounded workload runs twice, with the same `SchedulerConfig`
(`shunter.profiling.profiler.engine_scheduler_config`):

- real: one in-process instance of the built-in model on this machine, driven
  on the wall clock by `shunter.bench.replay` (requests admitted at their
  arrival times, one engine step after another, tokens stamped when their
  step returns);
- simulated: one `cpu` instance of `smollm2-135m` in `shunter.sim.Simulator`,
  with the `profiled` latency model fitted from a profile of this engine. By
  default the benchmark first profiles this machine (`shunter profile`'s grid,
  `--profile-rounds` times over): a profile describes the machine it was
  measured on, and hosts of one machine class differ (two profiles of this
  project's 2-core class, from an AMD and an Intel host, differ by 2x on
  prefill). `--profile PATH` reuses a profile measured here before;
  `--profile packaged` takes the one shipped with Shunter.

Workload: the first N requests of the ShareGPT length trace with lengths
scaled into a 1024-token context (the trace's 8k tokens become 1k), Poisson
arrivals at `--rate`, greedy decoding with `ignore_eos` and each request's own
`max_tokens`, so both runs generate exactly the same tokens per request. The
real prompts are random (seeded) token ids of those lengths.

It prints TTFT and TPOT p50/p99 of both and their relative errors
|sim - real| / real (target: every one <= 0.10), and, to explain a miss, how
well the latency model predicts the real run's own steps.

The real figures are only this engine's on an idle machine: torch runs a
thread per core, and a neighbour process that takes a core slows every step
several-fold. The replay measures how long its threads waited for a CPU and
warns above 5 % of the step time; `--wait-idle` waits for quiet first. Under
this load the percentiles move one to three times as much as the step times
(queueing), so a machine whose speed drifts by 5 % between the profile and
the replay moves them by 5-15 %.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from shunter.errors import CLIError, one_line_error

CONTEXT = 1024
SHAREGPT_MAX_TOKENS = 8192  # the length trace is filtered to 8k tokens per request
DEFAULT_REQUESTS = 100
CLUSTER_REQUESTS = 200
DEFAULT_RATE = 0.6
TARGET_ERROR = 0.10
DEFAULT_PROFILE_ROUNDS = 2  # one round leaves a grid point's mean 2-4 % off on a jittery 2-core machine
MAX_CONTENTION = 0.05  # above this, the replay was slowed by other processes (see runqueue_wait_seconds)
METRICS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")
PACKAGED = "packaged"  # `--profile packaged`: the profile shipped with Shunter
# KV blocks per instance in a cluster run: 1,024 tokens, one of the longest requests, so memory fills
# under the default load and Llumnix-style policies (which move requests off instances short of free
# blocks) have something to do.
CLUSTER_NUM_BLOCKS = 64
CLUSTER_CALIBRATION_REQUESTS = 40
CALIBRATION_SEED_OFFSET = 1000  # the calibration workload's seed: never the measured one
REPLAY_SEED_OFFSET = 2000  # prompt tokens of the measured workload's repeated replays (`--replays`)
CONTROL_INTERVAL = 0.05  # seconds: `shunter serve`'s default control and report intervals
# What a migration stage costs between two instances on one machine (Ray calls and a copy through
# shared memory): a few calls of a few ms each on a busy 2-core host, and memory-copy bandwidth.
MIGRATION_STAGE_LATENCY = 0.01
MIGRATION_BANDWIDTH = 2e9


@dataclass
class FidelityWorkload:
    """The same requests for both runs: `sim` for the simulator, `real` with prompt token ids for the engine."""

    sim: list  # WorkloadRequest
    real: list  # TimedRequest


def make_workload(num_requests: int, rate: float, seed: int, vocab_size: int,
                  context: int = CONTEXT) -> FidelityWorkload:
    """ShareGPT lengths scaled into `context`, Poisson arrivals at `rate`, seeded random prompt ids."""
    import numpy as np

    from shunter.bench.replay import TimedRequest
    from shunter.sim.workloads import WorkloadSpec, load_workload

    scale = context / SHAREGPT_MAX_TOKENS
    spec = WorkloadSpec("sharegpt", rate=rate, max_requests=num_requests, seed=seed)
    rng = np.random.default_rng(seed)
    sim, real = [], []
    for w in load_workload(spec):
        prompt = max(1, round(w.num_prompt_tokens * scale))
        output = max(1, min(round(w.num_output_tokens * scale), context - prompt))
        w = replace(w, num_prompt_tokens=prompt, num_output_tokens=output)
        sim.append(w)
        real.append(TimedRequest(w.request_id, w.arrival_time, _random_prompt(rng, prompt, vocab_size), output))
    return FidelityWorkload(sim, real)


def with_fresh_prompts(workload: FidelityWorkload, seed: int, vocab_size: int) -> FidelityWorkload:
    """The same requests (lengths, arrivals, ids) with other random prompt token ids: a repeated replay
    that the instances' prefix caches cannot serve from the replay before."""
    import numpy as np

    from shunter.bench.replay import TimedRequest

    rng = np.random.default_rng(seed)
    return FidelityWorkload(workload.sim, [
        TimedRequest(r.request_id, r.arrival_time, _random_prompt(rng, len(r.prompt_token_ids), vocab_size),
                     r.max_tokens) for r in workload.real])


def _random_prompt(rng, num_tokens: int, vocab_size: int) -> list[int]:
    """`num_tokens` random token ids of the vocabulary, above its special tokens."""
    from shunter.profiling.profiler import LOW_TOKEN_ID

    return rng.integers(LOW_TOKEN_ID, vocab_size, size=num_tokens).tolist()


def simulate(workload: FidelityWorkload, latency, max_model_len: int, num_instances: int = 1,
             policy: str | None = None, kv_bytes_per_block: int = 0, num_blocks: int | None = None):
    """The workload on simulated instances with the real engine's scheduler limits.

    One instance: no control loop (nothing to dispatch or migrate). Several: the
    policy bundle's dispatch and migration on load reports every
    `CONTROL_INTERVAL`, as the serving frontend runs them; a migration stage
    costs `MIGRATION_STAGE_LATENCY` plus its KV bytes at `MIGRATION_BANDWIDTH`.
    """
    from shunter.cluster.bundles import build_policy
    from shunter.cluster.migration import MigrationConfig
    from shunter.profiling.profiler import engine_scheduler_config
    from shunter.sim.simulator import SimConfig, Simulator

    scheduler = engine_scheduler_config(max_model_len)
    if num_blocks is not None:
        scheduler = replace(scheduler, num_blocks=num_blocks)
    if num_instances == 1:
        config = SimConfig(num_instances=1, scheduler=scheduler, control_interval=None)
    else:
        config = SimConfig(num_instances=num_instances, scheduler=scheduler, policy=build_policy(policy),
                           control_interval=CONTROL_INTERVAL,
                           migration=MigrationConfig(bandwidth_bytes_per_s=MIGRATION_BANDWIDTH,
                                                     kv_bytes_per_block=kv_bytes_per_block,
                                                     stage_latency=MIGRATION_STAGE_LATENCY))
    result = Simulator(config, latency, workload.sim).run()
    if result.rejected or result.unfinished:
        raise RuntimeError(f"the simulator left requests unserved: {result.rejected or result.unfinished}")
    return result


def latency_figures(records) -> dict[str, float]:
    from shunter.sim.metrics import summarize

    ttft = summarize(r.ttft for r in records)
    tpot = summarize(r.tpot for r in records if r.tpot is not None)
    return {"ttft_p50": ttft["p50"], "ttft_p99": ttft["p99"], "tpot_p50": tpot["p50"], "tpot_p99": tpot["p99"],
            "ttft_mean": ttft["mean"], "tpot_mean": tpot["mean"]}


def step_model_error(latency, steps) -> dict[str, float]:
    """How the latency model does on the real run's own steps: per step, and on their total."""
    predicted = [latency.step_time(s.prefill, s.num_decodes, s.sum_decode_context) for s in steps]
    errors = sorted(abs(p - s.seconds) / s.seconds for p, s in zip(predicted, steps))
    return {"steps": len(steps), "mean_abs_error": sum(errors) / len(errors),
            "median_abs_error": errors[len(errors) // 2],
            "busy_seconds_real": sum(s.seconds for s in steps), "busy_seconds_predicted": sum(predicted)}


def per_request(workload: FidelityWorkload, real_records, sim_records) -> list[dict]:
    """Each request's lengths and its TTFT/TPOT in both runs, in arrival order."""
    real = {r.request_id: r for r in real_records}
    sim = {r.request_id: r for r in sim_records}
    return [{"id": w.request_id, "arrival": w.arrival_time, "prompt": w.num_prompt_tokens,
             "output": w.num_output_tokens, "real_ttft": real[w.request_id].ttft, "sim_ttft": sim[w.request_id].ttft,
             "real_tpot": real[w.request_id].tpot, "sim_tpot": sim[w.request_id].tpot} for w in workload.sim]


def compare(real: dict[str, float], sim: dict[str, float]) -> dict[str, float]:
    return {f"{m}_err": abs(sim[m] - real[m]) / real[m] for m in METRICS}


def figures_and_errors(real_records, sim_records) -> dict:
    """The report's core: both runs' latency figures, the relative errors and the target."""
    real, sim = latency_figures(real_records), latency_figures(sim_records)
    return {**compare(real, sim), "target": TARGET_ERROR, "real": real, "sim": sim}


def format_report(report: dict) -> str:
    real, sim = report["real"], report["sim"]
    lines = [f"{'':<10} {'real':>9} {'sim':>9} {'error':>7}"]
    for m in METRICS:
        err = report[f"{m}_err"]
        flag = "" if err <= TARGET_ERROR else "  > target"
        lines.append(f"{m:<10} {real[m]:>8.3f}s {sim[m]:>8.3f}s {err:>7.1%}{flag}")
    c = report.get("calibration")
    if c is not None and c["scale"] is not None:
        lines.append(f"latency model scaled x{c['scale']:.3f} to the engine's steps on a separate calibration "
                     f"workload ({c['requests']} requests, {c['steps']} steps)")
    s = report["diagnostics"]["replay_steps"]
    lines.append(f"latency model on the real run's {s['steps']} steps: mean |error| {s['mean_abs_error']:.1%}, "
                 f"median {s['median_abs_error']:.1%}; busy time real {s['busy_seconds_real']:.1f} s, predicted "
                 f"{s['busy_seconds_predicted']:.1f} s; simulator {report['diagnostics']['sim_steps']} steps")
    d = report["diagnostics"]
    others = d["other_processes_cpus"]
    lines.append(f"driver gaps between steps {d['driver_gap_seconds']:.3f} s in total; replay {d['replay_seconds']:.1f} s; "
                 f"load average {d['load_average']}; other processes used "
                 f"{'?' if others is None else f'{others:.2f}'} CPUs")
    contention = d["replay_contention"]
    if contention is not None and contention > MAX_CONTENTION:
        lines.append(f"warning: other processes held this machine's CPUs during the replay (its threads waited "
                     f"{contention:.0%} of the step time for a CPU); the real figures are not this engine's alone, "
                     f"run again when the machine is idle")
    return "\n".join(lines)


def other_machine_warning(metadata: dict, this_cpu: str) -> str | None:
    """Why a profile may not describe this machine (measured on another CPU), or None."""
    measured_on = metadata.get("cpu")
    if measured_on is None or measured_on == this_cpu:
        return None
    return (f"the profile was measured on {measured_on!r}, this machine is {this_cpu!r}; the simulator will "
            f"predict that machine's latencies")


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "fidelity", help="simulator vs the real engine on one workload: TTFT/TPOT p50/p99 errors",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the errors and figures here")
    p.add_argument("--requests", type=int, default=None,
                   help=f"requests in the workload (default {DEFAULT_REQUESTS}; {CLUSTER_REQUESTS} with --instances > 1, "
                        f"so that p99 is not one request)")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="Poisson arrival rate, requests/s")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompt tokens")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="simulate with this profile JSON (measured on this machine), or 'packaged' for the one "
                        "shipped with Shunter (default: profile this machine first)")
    p.add_argument("--profile-rounds", type=int, default=None,
                   help=f"when profiling first: measure the grid this many times over (default "
                        f"{DEFAULT_PROFILE_ROUNDS}; 1 with --instances > 1, on the quick grid, as the run then "
                        f"scales the model to the serving runtime's steps)")
    p.add_argument("--save-profile", default=None, metavar="PATH", help="when profiling first: also write the profile here")
    p.add_argument("--quick-profile", action="store_true", help="when profiling first: the small grid of `profile --quick`")
    p.add_argument("--save-steps", default=None, metavar="PATH",
                   help="write the real run's steps (batch summary and wall time) here, in the profile format")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="model dtype (default: the profile's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before profiling and before the replay, wait up to this long for other processes "
                        "to leave the CPUs alone")
    p.add_argument("--instances", type=int, default=1,
                   help="real instances: above 1, the workload runs on that many Ray-actor instances behind the "
                        "serving frontend (dispatch and live migration by --policy) and on as many simulated ones")
    p.add_argument("--policy", default="llumnix", help="policy bundle of both clusters (with --instances > 1)")
    p.add_argument("--calibration-requests", type=int, default=None,
                   help="first replay this many requests of another seed on the same instance(s) and scale the "
                        "latency model to their steps (0: no calibration; default 40 with --instances > 1, "
                        "else 0)")
    p.add_argument("--num-blocks", type=int, default=CLUSTER_NUM_BLOCKS,
                   help="KV blocks per instance of both clusters (with --instances > 1): few enough that memory "
                        "fills and the migration policy has work")
    p.add_argument("--replays", type=int, default=1,
                   help="with --instances > 1: replay the measured workload this many times on the same "
                        "instances, and report how far the real runs are from each other (their own spread) "
                        "beside the simulator's error against each and against their median")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    p.error = one_line_error


def run(args: argparse.Namespace) -> int:
    from shunter.sim.profiled import packaged_profile

    cluster = args.instances > 1
    if args.requests is None:
        args.requests = CLUSTER_REQUESTS if cluster else DEFAULT_REQUESTS
    if args.calibration_requests is None:
        args.calibration_requests = CLUSTER_CALIBRATION_REQUESTS if cluster else 0
    if args.profile_rounds is None:
        # A cluster run scales the model to the serving runtime's own steps (calibration), so one round of
        # the quick grid does: the whole run stays within ~10 minutes on these 2-core hosts.
        args.profile_rounds = 1 if cluster else DEFAULT_PROFILE_ROUNDS
    if cluster and not args.profile:
        args.quick_profile = True
    if args.requests < 1:
        raise ValueError(f"--requests must be at least 1, got {args.requests}")
    if not args.rate > 0:
        raise ValueError(f"--rate must be a positive number of requests/s, got {args.rate}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if args.wait_idle < 0:
        raise ValueError(f"--wait-idle must be >= 0 seconds, got {args.wait_idle}")
    if args.instances < 1:
        raise ValueError(f"--instances must be at least 1, got {args.instances}")
    if args.calibration_requests < 0:
        raise ValueError(f"--calibration-requests must be >= 0, got {args.calibration_requests}")
    if args.num_blocks < 1:
        raise ValueError(f"--num-blocks must be at least 1, got {args.num_blocks}")
    if args.replays < 1:
        raise ValueError(f"--replays must be at least 1, got {args.replays}")
    if args.replays > 1 and not cluster:
        raise ValueError(f"--replays {args.replays} applies with --instances > 1 only")
    if args.instances > 1:
        from shunter.cluster.bundles import BUNDLES

        if args.policy not in BUNDLES.names():
            raise ValueError(f"unknown policy bundle {args.policy!r}: use one of {', '.join(BUNDLES.names())}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.profile_rounds < 1:
        raise ValueError(f"--profile-rounds must be at least 1, got {args.profile_rounds}")
    if args.profile and (args.save_profile or args.quick_profile):
        raise ValueError("--save-profile and --quick-profile apply only when the benchmark profiles this machine "
                         "(without --profile)")
    for path in (args.json_path, args.save_profile, args.save_steps):
        if path and not Path(path).parent.is_dir():
            raise ValueError(f"cannot write {path!r}: its directory does not exist")

    from shunter.profiling.machine import cpu_name, default_threads
    from shunter.sim.profiled import BUILTIN_MODEL_NAME, HARDWARE_NAME, Profile

    profile = None
    if args.profile:
        path = packaged_profile(HARDWARE_NAME, BUILTIN_MODEL_NAME) if args.profile == PACKAGED else args.profile
        if path is None:
            raise ValueError(f"no packaged {HARDWARE_NAME}/{BUILTIN_MODEL_NAME} profile in this installation; "
                             "give --profile PATH")
        profile = Profile.load(path)  # ValueError naming the path if it is missing or bad
        warning = other_machine_warning(profile.metadata, cpu_name())
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        dtype = args.dtype or profile.metadata["dtype"]
        threads = args.threads or profile.metadata["threads"]
    else:
        dtype = args.dtype or "auto"
        # Instances share this machine's cores: each is profiled with the threads it will run with.
        threads = args.threads or max(1, default_threads() // args.instances)
    show = not args.quiet and sys.stderr.isatty()
    return _run(args, profile, dtype, threads, show)


def _run(args, profile, dtype: str, threads: int, show_progress: bool) -> int:
    from shunter.bench.replay import replay
    from shunter.profiling.machine import CpuSnapshot, cpu_name, load_average, wait_until_idle
    from shunter.profiling.profiler import DEFAULT_GRID, QUICK_GRID, MachineBusyError, Profiler
    from shunter.profiling.real import build_engine, profile_engine
    from shunter.profiling.report import fit_summary
    from shunter.sim.profiled import ProfiledLatency

    real = build_engine(dtype, threads)
    if profile is not None and (profile.metadata["dtype"] != real.dtype or profile.metadata["threads"] != real.threads):
        print(f"warning: the profile was measured with {profile.metadata['dtype']} and {profile.metadata['threads']} "
              f"threads, this engine runs {real.dtype} with {real.threads}", file=sys.stderr)
    if profile is None:
        grid = QUICK_GRID if args.quick_profile else DEFAULT_GRID
        if args.wait_idle:
            wait_until_idle(args.wait_idle)
        print(f"profiling this machine ({cpu_name()}) first: {args.profile_rounds} round(s) of the "
              f"{'quick' if args.quick_profile else 'default'} grid")
        try:
            profile, points, held_out = profile_engine(real, grid, show_progress=show_progress,
                                                       rounds=args.profile_rounds)
        except MachineBusyError as e:
            raise CLIError(str(e)) from None
        latency = ProfiledLatency.from_profile(profile)
        profile.metadata["fit"] = fit_summary(latency, points, held_out)
        if args.save_profile:
            profile.save(args.save_profile)
    else:
        latency = ProfiledLatency.from_profile(profile)
        # One-time costs (kernel set-up, allocator growth) are not part of serving.
        Profiler(real.engine, real.vocab_size, DEFAULT_GRID).warmup()

    workload = make_workload(args.requests, args.rate, args.seed, real.vocab_size)
    num_prompt = sum(w.num_prompt_tokens for w in workload.sim)
    num_output = sum(w.num_output_tokens for w in workload.sim)
    span = workload.sim[-1].arrival_time
    print(f"{len(workload.sim)} requests over {span:.0f} s ({args.rate:g} req/s): {num_prompt} prompt + {num_output} "
          f"output tokens; {real.dtype}, {real.threads} threads; profile fit error {latency.fit_error:.1%}")

    if args.instances > 1:
        return _run_cluster(args, real, workload, latency, profile, show_progress)
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    calibration_steps, scale = [], None
    if args.calibration_requests:
        calibration = make_workload(args.calibration_requests, args.rate, args.seed + CALIBRATION_SEED_OFFSET,
                                    real.vocab_size)
        calibration_steps = replay(real.engine, calibration.real).steps
        latency, scale = calibrated(latency, calibration_steps)
    load_before = load_average()
    cpu_before = CpuSnapshot.take()
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(workload.real), unit="req", desc="replaying", leave=False)
    try:
        measured = replay(real.engine, workload.real, on_finish=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    load_after = load_average()
    others = None if cpu_before is None else CpuSnapshot.take().others_since(cpu_before)

    t0 = time.perf_counter()
    sim_result = simulate(workload, latency, real.max_model_len)
    sim_wall = time.perf_counter() - t0

    report = {
        **figures_and_errors(measured.records, sim_result.records),
        "workload": {"requests": len(workload.sim), "rate": args.rate, "seed": args.seed, "context": CONTEXT,
                     "prompt_tokens": num_prompt, "output_tokens": num_output, "span_seconds": span},
        "engine": {"dtype": real.dtype, "threads": real.threads, "attention_backend": real.attention_backend,
                   "scheduler": {k: getattr(real.engine.config, k) for k in (
                       "num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
                       "enable_prefix_caching")}},
        "profile": {"source": args.profile or f"measured in this run ({args.profile_rounds} rounds)",
                    "cpu": profile.metadata.get("cpu"),
                    "coefficients": latency.coefficients, "fit_error": latency.fit_error,
                    "measured_at": profile.metadata.get("measured_at"),
                    "load_average": profile.metadata.get("load_average")},
        "requests": per_request(workload, measured.records, sim_result.records),
        "calibration": {"requests": args.calibration_requests, "steps": len(calibration_steps), "scale": scale},
        "diagnostics": {
            "replay_steps": step_model_error(latency, measured.steps),
            "sim_steps": sim_result.instance_num_steps["0"],
            "driver_gap_seconds": measured.step_gaps,
            "replay_contention": measured.contention,
            "other_processes_cpus": others,
            "replay_seconds": measured.wall_seconds,
            "sim_wall_seconds": sim_wall,
            "load_average": {"before": load_before, "after": load_after},
        },
    }
    print(format_report(report))
    if args.save_steps:
        from shunter.sim.profiled import Profile

        metadata = {**profile.metadata, "source": "the real run of shunter bench fidelity (one step per entry)",
                    "workload": report["workload"]}
        metadata.pop("fit", None)
        Profile(metadata, measured.steps).save(args.save_steps)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


def _run_cluster(args, real, workload: FidelityWorkload, latency, profile, show_progress: bool) -> int:
    """`--instances N`: the workload on N real instances behind the serving frontend, then in the simulator."""
    import asyncio

    from shunter.model.executor import kv_bytes_per_block
    from shunter.profiling.machine import load_average

    kv_bytes = kv_bytes_per_block(real.engine.executor.model.config, real.engine.config.block_size,
                                  real.engine.executor.model.dtype)
    config = replace(real.engine.config, num_blocks=args.num_blocks)
    del real.engine  # the profiling engine's weights and KV cache: the instances load their own
    load_before = load_average()
    # Calibration: another workload (its own seed) on the same instances first; its steps scale the
    # latency model to the serving runtime. The measured replay is never used to fit anything.
    calibration = None
    if args.calibration_requests:
        calibration = make_workload(args.calibration_requests, args.rate, args.seed + CALIBRATION_SEED_OFFSET,
                                    real.vocab_size)
    replays, calibration_run = asyncio.run(_replay_on_cluster(args, real, workload, config, show_progress,
                                                              calibration))
    measured = replays[0]  # the report's figures are the first replay's; later ones give the spread
    calibration_steps = calibration_run.steps if calibration_run is not None else []
    calibration_by_instance = calibration_run.steps_by_instance if calibration_run is not None else {}
    load_after = load_average()
    scale = None
    if calibration_steps:
        latency, scale = calibrated(latency, calibration_steps)
    t0 = time.perf_counter()
    sim_result = simulate(workload, latency, real.max_model_len, args.instances, args.policy, kv_bytes,
                          args.num_blocks)
    sim_wall = time.perf_counter() - t0
    report = {
        **figures_and_errors(measured.records, sim_result.records),
        "instances": args.instances,
        "policy": args.policy,
        "migrations": {"real": measured.num_committed, "real_aborted": len(measured.migrations) - measured.num_committed,
                       "sim": _sim_migrations(sim_result)},
        "finished_on": {"real": _finished_on(measured), "sim": _finished_on(sim_result)},
        "workload": {"requests": len(workload.sim), "rate": args.rate, "seed": args.seed, "context": CONTEXT,
                     "prompt_tokens": sum(w.num_prompt_tokens for w in workload.sim),
                     "output_tokens": sum(w.num_output_tokens for w in workload.sim),
                     "span_seconds": workload.sim[-1].arrival_time},
        "engine": {"dtype": real.dtype, "threads_per_instance": real.threads, "scheduler": {k: getattr(config, k) for k in (
            "num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
            "enable_prefix_caching")}},
        "profile": {"source": args.profile or f"measured in this run ({args.profile_rounds} rounds)",
                    "cpu": profile.metadata.get("cpu"), "coefficients": latency.coefficients,
                    "fit_error": latency.fit_error},
        "requests": per_request(workload, measured.records, sim_result.records),
        "calibration": {"requests": args.calibration_requests, "steps": len(calibration_steps), "scale": scale},
        "diagnostics": {"replay_steps": step_model_error(latency, measured.steps) if measured.steps else None,
                        # The (scaled) model against steps with and without another instance stepping meanwhile.
                        "co_running": {"calibration": co_running(latency, calibration_by_instance),
                                       "replay": co_running(latency, measured.steps_by_instance)},
                        "sim_steps": sum(sim_result.instance_num_steps.values()),
                        "replay_seconds": measured.wall_seconds, "sim_wall_seconds": sim_wall,
                        "load_average": {"before": load_before, "after": load_after}},
    }
    if len(replays) > 1:
        report["replays"] = replay_spread([latency_figures(r.records) for r in replays], report["sim"])
        for entry, r in zip(report["replays"]["runs"], replays):
            entry["migrations"] = {"real": r.num_committed, "real_aborted": len(r.migrations) - r.num_committed}
    print(format_cluster_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


async def _replay_on_cluster(args, real, workload: FidelityWorkload, config, show_progress: bool,
                             calibration: FidelityWorkload | None = None):
    from shunter.bench.cluster_replay import replay_cluster
    from shunter.cluster.bundles import build_policy
    from shunter.runtime.spec import InstanceSpec
    from shunter.server.cli import start_ray
    from shunter.server.frontend import Frontend
    from shunter.server.runner import ray_handles

    start_ray(None)
    spec = InstanceSpec(dtype=real.dtype, num_threads=real.threads, block_size=config.block_size,
                        num_blocks=config.num_blocks, max_num_seqs=config.max_num_seqs,
                        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
                        enable_prefix_caching=config.enable_prefix_caching, report_interval=CONTROL_INTERVAL,
                        seed=args.seed, record_steps=True)
    frontend = Frontend(ray_handles, spec, build_policy(args.policy), "fidelity", eos_token_id=None,
                        seed=args.seed, control_interval=CONTROL_INTERVAL)
    bar = None
    try:
        await frontend.start(args.instances)
        await _warm_up(frontend, real.vocab_size)
        frontend.migrations.history.clear()
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(workload.real) * args.replays, unit="req", desc="replaying", leave=False)
        calibration_run = None
        if calibration is not None:
            calibration_run = await _steps_of(frontend, replay_cluster(frontend, calibration.real))
        results = []
        for k in range(args.replays):
            frontend.migrations.history.clear()
            # Each replay after the first: its own prompt tokens, so no prefix-cache hit carries over.
            requests = workload.real if k == 0 else with_fresh_prompts(
                workload, args.seed + REPLAY_SEED_OFFSET + k, real.vocab_size).real
            results.append(await _steps_of(frontend, replay_cluster(frontend, requests,
                                                                    on_finish=bar.update if bar else None)))
        return results, calibration_run
    finally:
        if bar is not None:
            bar.close()
        await frontend.shutdown()
        import ray

        ray.shutdown()


async def _steps_of(frontend, replay):
    """Run `replay`; its result, with `.steps` set to the instances' own steps during it."""
    before = {h.instance_id: len(await h.recorded_steps()) for h in frontend.handles.values()}
    result = await replay
    result.steps_by_instance = {h.instance_id: (await h.recorded_steps())[before[h.instance_id]:]
                                for h in frontend.handles.values()}
    result.steps = [s for steps in result.steps_by_instance.values() for s in steps]
    return result


def co_running(latency, steps_by_instance: dict[str, list]) -> dict:
    """How the real steps compare with the latency model when another instance was stepping at the
    same time and when none was: instances that share a host's cores and memory slow each other,
    which a model profiled on one instance alone does not see. A step counts as co-running when
    steps of other instances cover at least half of it (instances on one machine share its
    monotonic clock). Per group: how many steps, and real over predicted seconds in total."""
    spans = {iid: sorted((s.ended_at - s.seconds, s.ended_at) for s in steps)
             for iid, steps in steps_by_instance.items()}
    groups: dict[str, list[float]] = {"co_running": [0, 0.0, 0.0], "alone": [0, 0.0, 0.0]}
    for iid, steps in steps_by_instance.items():
        others = sorted(span for other, ss in spans.items() if other != iid for span in ss)
        starts = [a for a, _ in others]
        for s in steps:
            lo, hi = s.ended_at - s.seconds, s.ended_at
            covered = 0.0
            i = max(0, bisect.bisect_right(starts, lo) - 1)
            while i < len(others) and others[i][0] < hi:
                covered += max(0.0, min(hi, others[i][1]) - max(lo, others[i][0]))
                i += 1
            g = groups["co_running" if covered >= 0.5 * s.seconds else "alone"]
            g[0] += 1
            g[1] += s.seconds
            g[2] += latency.step_time(s.prefill, s.num_decodes, s.sum_decode_context)
    return {name: {"steps": n, "real_over_predicted": real / predicted if predicted else None}
            for name, (n, real, predicted) in groups.items()}


def replay_spread(real_runs: list[dict[str, float]], sim: dict[str, float]) -> dict:
    """Several real replays of one workload against one simulation: each run's figures and the
    simulator's errors against it; per metric the real runs' own spread, (max - min) / median (how
    far the real system is from repeating itself: no prediction is within half of it of every run);
    and the simulator's error against the runs' median."""
    import statistics

    median = {m: statistics.median(r[m] for r in real_runs) for m in METRICS}
    return {
        "runs": [{"real": {m: r[m] for m in METRICS}, "errors": compare(r, sim)} for r in real_runs],
        "real_spread": {m: (max(r[m] for r in real_runs) - min(r[m] for r in real_runs)) / median[m]
                        for m in METRICS},
        "real_median": median,
        "errors_vs_median": compare(median, sim),
    }


def calibrated(latency, steps):
    """The latency model scaled so that it predicts `steps` (the real run's own, on a calibration
    workload) in total: the profiler times bare steps of a grid, one shape at a time; a serving
    instance also answers polls and migration calls in its process, beside a frontend and Ray on
    the same cores, and a machine's speed drifts between the profile and the replay.
    Returns (model, scale)."""
    from shunter.sim.profiled import ProfiledLatency

    predicted = sum(latency.step_time(s.prefill, s.num_decodes, s.sum_decode_context) for s in steps)
    scale = sum(s.seconds for s in steps) / predicted
    scaled = ProfiledLatency({f: c * scale for f, c in latency.coefficients.items()}, latency.metadata)
    scaled.fit_error = latency.fit_error
    return scaled, scale


async def _warm_up(frontend, vocab_size: int) -> None:
    """One short request per instance: one-time costs (kernel set-up, allocator growth) are not serving."""
    from shunter.request import SamplingParams

    for handle in list(frontend.handles.values()):
        stream = frontend.submit([100 + i % (vocab_size - 100) for i in range(300)],
                                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        async for event in frontend.events(stream):
            if event.finish_reason is not None:
                break


def _sim_migrations(result) -> int:
    return sum(1 for m in result.migrations if m.outcome == "committed")


def _finished_on(result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in result.records:
        counts[r.instance_id] = counts.get(r.instance_id, 0) + 1
    return counts


def format_cluster_report(report: dict) -> str:
    real, sim = report["real"], report["sim"]
    lines = [f"{report['instances']} instances, policy {report['policy']}",
             f"{'':<10} {'real':>9} {'sim':>9} {'error':>7}"]
    for m in METRICS:
        err = report[f"{m}_err"]
        flag = "" if err <= TARGET_ERROR else "  > target"
        lines.append(f"{m:<10} {real[m]:>8.3f}s {sim[m]:>8.3f}s {err:>7.1%}{flag}")
    mig = report["migrations"]
    lines.append(f"migrations committed: real {mig['real']} ({mig['real_aborted']} aborted), sim {mig['sim']}")
    lines.append(f"requests per instance (where they finished): real {report['finished_on']['real']}, "
                 f"sim {report['finished_on']['sim']}")
    c = report["calibration"]
    if c["scale"] is not None:
        lines.append(f"latency model scaled x{c['scale']:.3f} to the serving runtime's steps on a separate "
                     f"calibration workload ({c['requests']} requests, {c['steps']} steps)")
    d = report["diagnostics"]
    s = d["replay_steps"]
    if s is not None:
        lines.append(f"latency model on the real instances' {s['steps']} steps: mean |error| {s['mean_abs_error']:.1%}, "
                     f"median {s['median_abs_error']:.1%}; busy time real {s['busy_seconds_real']:.1f} s, predicted "
                     f"{s['busy_seconds_predicted']:.1f} s; simulator {d['sim_steps']} steps")
    for phase, groups in (d.get("co_running") or {}).items():
        parts = [f"{name.replace('_', '-')} {g['steps']} steps, real/predicted {g['real_over_predicted']:.3f}"
                 for name, g in groups.items() if g["steps"]]
        if parts:
            lines.append(f"{phase} steps, another instance stepping meanwhile or not: " + "; ".join(parts))
    lines.append(f"replay {d['replay_seconds']:.1f} s; load average {d['load_average']}")
    spread = report.get("replays")
    if spread is not None:
        lines.append(f"{len(spread['runs'])} replays of the same workload, real figures (simulator's error):")
        for m in METRICS:
            runs = ", ".join(f"{r['real'][m]:.3f}s ({r['errors'][f'{m}_err']:.1%})" for r in spread["runs"])
            lines.append(f"  {m:<10} {runs}; real spread {spread['real_spread'][m]:.1%}, simulator vs their "
                         f"median {spread['errors_vs_median'][f'{m}_err']:.1%}")
    return "\n".join(lines)
