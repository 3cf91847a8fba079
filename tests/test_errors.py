"""The CLI's error type lives below the CLI: command modules raise it without importing `shunter.cli`."""

from __future__ import annotations

import argparse

from shunter import cli, errors
from shunter.errors import CLIError
from tests.imports import PACKAGE_DIR, imported_modules, names_module, package_files


def test_only_the_entry_point_imports_the_cli():
    # `shunter.cli` imports every command module; one importing it back is a cycle.
    importers = [p.relative_to(PACKAGE_DIR).as_posix() for p in package_files()
                 if p.name != "__main__.py" and p != PACKAGE_DIR / "cli.py"
                 and names_module(imported_modules(p), "shunter.cli")]
    assert importers == []


def test_cli_reports_the_shared_error_as_one_line(monkeypatch, capsys):
    assert cli.CLIError is errors.CLIError

    def raise_error(args):
        raise CLIError("the machine is busy")

    parser = argparse.ArgumentParser(prog="shunter")
    parser.set_defaults(func=raise_error)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    assert capsys.readouterr().err == "shunter: error: the machine is busy\n"
