"""Errors and error forms shared by the command-line handlers.

They live below `shunter.cli` so that a command's module can raise a
user-facing error without importing the CLI that imports it.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class CLIError(Exception):
    """A user-facing error: `shunter` prints it as one line and exits with status 2."""


def one_line_error(message: str) -> NoReturn:
    """argparse's own errors in the CLI's one-line form (exit status 2); set as a parser's `error`."""
    print(f"shunter: error: {message}", file=sys.stderr)
    raise SystemExit(2)
