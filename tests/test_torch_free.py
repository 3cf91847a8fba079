"""The core runs without torch: the scheduler, the simulator and the CLI's help; model commands say what is missing.

Two kinds of check: static (no torch-free module names torch in any import
statement, even one inside a function that a test would never reach), and a
subprocess in which importing torch and the other model packages fails, as on
an installation without the `model` extra.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shunter.cli import MODEL_EXTRA_PACKAGES
from tests.imports import PACKAGE_DIR, imported_modules, names_module, package_files

REPO = PACKAGE_DIR.parent
# Modules that need torch (directly or through the model); the torch-free ones must not import them.
MODEL_MODULES = ("shunter.model", "shunter.llm", "shunter.profiling.real")


def _forbidden(names: set[str], modules) -> list[str]:
    return sorted(m for m in modules if names_module(names, m))


@pytest.mark.parametrize("package", ["sim", "engine", "cluster"])
def test_torch_free_packages_name_no_model_package_anywhere(package):
    forbidden = [*MODEL_EXTRA_PACKAGES, *MODEL_MODULES, "shunter.profiling", "shunter.bench", "shunter.cli"]
    found = {p.relative_to(PACKAGE_DIR).as_posix(): bad for p in package_files(package)
             if (bad := _forbidden(imported_modules(p), forbidden))}
    assert found == {}


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: its import statements outside function bodies."""
    names: set[str] = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))
    return names


def test_cli_modules_import_no_model_package_at_top_level():
    from shunter.bench.cli import BENCH_MODULES
    from shunter.cli import COMMAND_MODULES

    modules = ["shunter", "shunter.cli", "shunter.errors", *COMMAND_MODULES, *BENCH_MODULES]
    found = {}
    for module in modules:
        rel = Path(*module.split(".")[1:])
        path = PACKAGE_DIR / rel / "__init__.py" if (PACKAGE_DIR / rel).is_dir() else PACKAGE_DIR / f"{rel}.py"
        bad = _forbidden(_top_level_imports(path), [*MODEL_EXTRA_PACKAGES, *MODEL_MODULES])
        if bad:
            found[module] = bad
    assert found == {}


def test_model_packages_are_an_extra_of_the_torch_free_core():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the project supports 3.10
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {r.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip() for r in requirements}

    assert names(project["dependencies"]) == {"numpy", "scipy", "tqdm", "matplotlib"}
    model = project["optional-dependencies"]["model"]
    assert names(model) == MODEL_EXTRA_PACKAGES
    assert "torch==2.13.0" in model  # an open range pulls the CUDA build on a CPU machine
    assert "-e '.[model,serve,test]'" in (REPO / "scripts" / "setup.sh").read_text()


# ---- without torch, for real ---------------------------------------------------------------------
SITECUSTOMIZE = """
import sys

BLOCKED = {blocked!r}


class NoModelPackages:
    # As on an installation without the model extra: importing one fails like a missing package.
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{top!r}}", name=top)
        return None


sys.meta_path.insert(0, NoModelPackages())
"""


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """Environment variables for a Python in which torch, transformers, ... cannot be imported."""
    site = tmp_path_factory.mktemp("no-torch")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=sorted(MODEL_EXTRA_PACKAGES)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_without_torch(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks(no_torch_env):
    done = run_without_torch(no_torch_env, "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_core_packages_import_without_torch(no_torch_env):
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        import shunter, shunter.cli
        names = []
        for package in ("shunter.sim", "shunter.engine", "shunter.cluster", "shunter.profiling", "shunter.bench"):
            module = importlib.import_module(package)
            names += [package] + [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
    """)
    done = run_without_torch(no_torch_env, "-c", script)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["simulate", "--list"], ["profile", "--help"],
                                  ["bench", "--help"]])
def test_help_and_listing_without_torch(no_torch_env, argv):
    done = run_without_torch(no_torch_env, "-m", "shunter", *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout


@pytest.mark.parametrize("latency", [[], ["--latency-model", "profiled", "--hardware", "cpu", "--model", "smollm2-135m"]])
def test_simulate_without_torch(no_torch_env, tmp_path, latency):
    out = tmp_path / "report.json"
    done = run_without_torch(no_torch_env, "-m", "shunter", "simulate", "--trace", "sharegpt", "--max-requests", "20",
                             "--rate", "2", "--quiet", "--json", str(out), *latency)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["completed"] == 20


@pytest.mark.parametrize("argv", [["profile", "--quick", "--json", "p.json"], ["generate", "hi"]])
def test_model_commands_say_which_extra_is_missing(no_torch_env, tmp_path, argv):
    done = subprocess.run([sys.executable, "-m", "shunter", *argv], env=no_torch_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"shunter: error: shunter {argv[0]} needs ") and "pip install 'shunter[model]'" in err
