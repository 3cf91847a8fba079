"""Static import scanning: which modules a source file names in its import statements, at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

import shunter

PACKAGE_DIR = Path(shunter.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names, inside functions too.

    `from a.b import c` yields both `a.b` and `a.b.c` (c may be a submodule);
    relative imports are resolved against the file's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_files(*subpackages: str) -> list[Path]:
    """The .py files of `shunter` (no argument) or of the named subpackages, e.g. "sim"."""
    roots = [PACKAGE_DIR / s for s in subpackages] if subpackages else [PACKAGE_DIR]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def names_module(names: set[str], module: str) -> bool:
    """Whether `names` imports `module` or something inside it."""
    return any(n == module or n.startswith(module + ".") for n in names)
