"""`shunter profile`: measure the real engine's steps on this machine and write a profile JSON.

    shunter profile --json cpu.json                 # default grid, a few minutes on 2 cores
    shunter simulate --latency-model profiled --profile cpu.json ...

The built-in model runs in-process (`InstanceEngine` + `ModelExecutor`, the
scheduler limits of `profiler.engine_scheduler_config`, the same as `shunter
bench fidelity`). Every measured batch is built by the real scheduler from
requests with chosen prompt lengths, never by hand: the grid and what a step's
time covers are described in `shunter/profiling/profiler.py`.

Other processes: torch runs one thread per core, so a neighbour that takes a
core for a moment stalls every thread at the next barrier and a step can run
5-15x slower. A step whose threads waited for a CPU (Linux schedstat) for more
than a tenth of its time is measured again; `--wait-idle` first waits for the
machine to be idle; the metadata records how much other processes ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shunter.errors import CLIError, one_line_error


def register(subparsers) -> None:
    """Add `shunter profile` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "profile", help="measure the real engine's step times on this machine (profile JSON for the simulator)",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", dest="json_path", default="profile.json", metavar="PATH", help="write the profile here")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype (auto: bfloat16 where the CPU computes it natively)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--quick", action="store_true", help="a small grid (under a minute; for tests)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the grid this many times over and pool the samples (averages out a machine "
                        "whose speed drifts from minute to minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to leave the CPUs alone")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_profile)
    p.error = one_line_error


def run_profile(args: argparse.Namespace) -> int:
    """Profile the built-in model on this machine and write the profile JSON (see the module docstring)."""
    from shunter.profiling.machine import default_threads

    threads = args.threads if args.threads is not None else default_threads()
    if threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    out = Path(args.json_path)
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    if args.wait_idle < 0:
        raise ValueError(f"--wait-idle must be >= 0 seconds, got {args.wait_idle}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    # Imported here, not at the top: `shunter --help` must not load the simulator or torch.
    from shunter.profiling.machine import cpu_name, load_average, wait_until_idle
    from shunter.profiling.profiler import DEFAULT_GRID, QUICK_GRID, MachineBusyError
    from shunter.profiling.real import build_engine, profile_engine
    from shunter.profiling.report import fit_summary, format_report
    from shunter.sim.profiled import BUILTIN_MODEL_NAME, ProfiledLatency

    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    real = build_engine(args.dtype, threads, args.seed)
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    print(f"profiling {BUILTIN_MODEL_NAME} ({real.dtype}, {real.threads} threads, decode attention "
          f"{real.attention_backend}) on {cpu_name()}; load average {load_average()}")
    try:
        profile, points, held_out = profile_engine(real, grid, show_progress=not args.quiet and sys.stderr.isatty(),
                                                   seed=args.seed, rounds=args.rounds)
    except MachineBusyError as e:
        raise CLIError(str(e)) from None
    model = ProfiledLatency.from_profile(profile)
    profile.metadata["fit"] = fit_summary(model, points, held_out)
    print(format_report(model, points, held_out))
    profile.save(out)
    meta = profile.metadata
    print(f"wrote {out} ({len(profile.steps)} steps, {meta['profile_seconds']:.0f} s; load average "
          f"{meta['load_average']}, other processes used {meta['other_processes_cpus']} CPUs; "
          f"{meta['contended_steps_discarded']} steps slowed by them measured again)")
    return 0

