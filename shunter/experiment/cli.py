"""`shunter experiment llumnix [--quick] [--json PATH] [--out DIR]`: the Llumnix evaluation in simulation.

Heavy imports happen inside the handler so `shunter --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys

from shunter.sim.cli import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="reproducible experiments in simulation",
                              description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    names = p.add_subparsers(dest="experiment", metavar="NAME", required=True)
    e = names.add_parser("llumnix", help="the Llumnix (OSDI'24) evaluation: rr vs infaas vs llumnix vs shunter "
                                         "on 16 simulated A10s", formatter_class=HelpFormatter)
    e.add_argument("--quick", action="store_true", help="fewer requests per run and coarser searches (< 10 minutes)")
    e.add_argument("--requests", type=int, default=None, help="requests per run (default 10,000; --quick 2,500)")
    e.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    e.add_argument("--scenario", action="append", default=None, metavar="KEY",
                   help="run only this scenario (repeatable; default all)")
    e.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write every figure here")
    e.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="write results.md (tables) and plots here")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os
    import time

    from shunter.experiment import llumnix
    from shunter.experiment.report import plot_results, render_markdown

    sizes = llumnix.QUICK if args.quick else llumnix.FULL
    if args.requests is not None:
        if args.requests < 100:
            raise ValueError(f"--requests must be at least 100, got {args.requests}")
        sizes = dataclasses.replace(sizes, num_requests=args.requests)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    known = {s.key: s for s in llumnix.SCENARIOS}
    for key in args.scenario or ():
        if key not in known:
            raise ValueError(f"unknown scenario {key!r}; choose from: {', '.join(known)}")
    scenarios = tuple(known[k] for k in args.scenario) if args.scenario else llumnix.SCENARIOS

    from tqdm import tqdm

    bar = tqdm(total=llumnix.plan_size(sizes, scenarios), unit="run", desc="llumnix experiment",
               disable=not sys.stderr.isatty())
    t0 = time.perf_counter()
    try:
        results = llumnix.run_experiment(sizes, seed=args.seed, tick=lambda: bar.update(1), scenarios=scenarios)
    finally:
        bar.close()
    results["wall_seconds"] = time.perf_counter() - t0
    results["quick"] = args.quick
    markdown = render_markdown(results)
    print(markdown)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "results.md"), "w") as f:
            f.write(markdown)
        plot_results(results, args.out_dir)
    return 0
