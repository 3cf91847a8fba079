"""`shunter` command line: generate | simulate | profile | bench ...

Each subcommand lives in the module of its concern and exposes
`register(subparsers)`; the module's top level stays free of heavy imports so
`shunter --help` is instant. Bad input ends in a one-line message and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from shunter.errors import CLIError

# Modules that add a top-level subcommand.
COMMAND_MODULES = [
    "shunter.generate_cli",
    "shunter.server.cli",
    "shunter.sim.cli",
    "shunter.profiling.cli",
    "shunter.bench.cli",
    "shunter.experiment.cli",
]

# What `pip install 'shunter[model]'` adds to the torch-free core (pyproject's `model` extra).
MODEL_EXTRA_PACKAGES = frozenset({"torch", "transformers", "tokenizers", "gguf", "accelerate", "safetensors"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shunter", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"shunter: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # The core installs without torch; a command that needs the real model says how to get it.
        missing = (e.name or "").split(".")[0]
        if missing not in MODEL_EXTRA_PACKAGES:
            raise
        print(f"shunter: error: shunter {args.command} needs {missing} (the model extra): "
              "pip install 'shunter[model]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shunter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
