"""`shunter bench NAME`: every benchmark registers itself here."""

from __future__ import annotations

import importlib

BENCH_MODULES = [
    "shunter.bench.engine_bench",
    "shunter.bench.sim_bench",
    "shunter.bench.fidelity",
    "shunter.bench.startup_bench",
    "shunter.bench.frontend_bench",
    "shunter.bench.peer_bench",
    "shunter.bench.migration_bench",
    "shunter.bench.serve_bench",
    "shunter.bench.soak_bench",
    "shunter.bench.gateway_bench",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (prints figure and baseline)")
    bench_sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name in BENCH_MODULES:
        module = importlib.import_module(name)
        module.register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
