"""The package's own source files that a module runs: the modules it imports, traced
through the package's import statements (read with :mod:`ast`, nothing imported).

The rules list these as their code inputs (:func:`module_sources`), so editing a module
reruns exactly the jobs that run it; the capture stage keys its resume folder by them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _module_path(dotted: str) -> Path | None:
    base = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_modules(path: Path) -> list[Path]:
    """attnlab modules that a source file imports (``from attnlab.x import y`` may name a
    submodule y or an object of module x)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "attnlab":
            pkg = node.module.removeprefix("attnlab").lstrip(".")
            subs = [_module_path(f"{pkg}.{a.name}".lstrip(".")) for a in node.names]
            found += [m for m in subs if m is not None] or [_module_path(pkg)]
        elif isinstance(node, ast.Import):
            found += [
                _module_path(a.name.removeprefix("attnlab").lstrip("."))
                for a in node.names
                if a.name.split(".")[0] == "attnlab"
            ]
    return [m for m in found if m is not None]


def module_sources(*modules: str, root: str | Path | None = None) -> list[str]:
    """Source files of package modules and every attnlab module they import, transitively.

    ``modules`` are dotted names inside the package ("niah", "policies.cab"). Rules list
    these as inputs, so editing a module re-runs exactly the rules that run it. Paths are
    relative to ``root`` when given.
    """
    seen: dict[Path, None] = {}
    todo = [p for p in (_module_path(m) for m in modules) if p is not None]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen[path] = None
            todo.extend(_imported_modules(path))
    out = sorted(seen)
    if root is not None:
        base = Path(root).resolve()
        out = [p.relative_to(base) if p.is_relative_to(base) else p for p in out]
    return [str(p) for p in out]
