"""The walls of DESIGN §3: the engine knows no cluster, the cluster no simulator or server, the simulator no
server; scheduling code reads no clock and does no I/O (static checks over every import statement)."""

from __future__ import annotations

import pytest

from tests.imports import PACKAGE_DIR, imported_modules, names_module, package_files

WALLS = {
    # package: modules it must never import
    "engine": ["shunter.cluster", "shunter.sim", "shunter.experiment", "shunter.bench", "shunter.server",
               "shunter.runtime", "shunter.gateway"],
    "cluster": ["shunter.sim", "shunter.experiment", "shunter.bench", "shunter.server", "shunter.runtime", "ray",
                "shunter.gateway"],
    "sim": ["shunter.server", "shunter.runtime", "ray", "fastapi", "uvicorn", "shunter.gateway"],
    # The gateway needs no model: it proxies to servers that have one.
    "gateway": ["torch", "transformers", "shunter.model", "shunter.server.app", "shunter.server.runner", "ray"],
}
# Scheduling code takes `now` from its caller and touches nothing outside: no clock, no I/O, no asyncio.
CLOCK_AND_IO = ["time", "datetime", "asyncio", "socket", "threading", "subprocess", "os", "io", "pathlib"]


@pytest.mark.parametrize("package", sorted(WALLS))
def test_package_imports_nothing_beyond_its_wall(package):
    found = {p.relative_to(PACKAGE_DIR).as_posix(): bad for p in package_files(package)
             if (bad := sorted(m for m in WALLS[package] if names_module(imported_modules(p), m)))}
    assert found == {}


@pytest.mark.parametrize("package", ["engine", "cluster"])
def test_scheduling_code_reads_no_clock_and_does_no_io(package):
    found = {p.relative_to(PACKAGE_DIR).as_posix(): bad for p in package_files(package)
             if (bad := sorted(m for m in CLOCK_AND_IO if names_module(imported_modules(p), m)))}
    assert found == {}
