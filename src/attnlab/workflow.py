"""Pure-Python helpers for the Snakefile: file names, model keys, code dependencies.

Nothing here imports torch, so Snakemake starts fast.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_IMPORT = re.compile(r"^\s*from attnlab((?:\.\w+)*) import ([\w, ]+)", re.M)


def pct(sparsity: float) -> str:
    """File-name form of a sparsity: 0.99 -> '99', 0.995 -> '99.5'."""
    return f"{round(sparsity * 100, 6):g}"


def sparsity(pct_str: str) -> float:
    return round(float(pct_str) / 100.0, 8)


def model_key(name: str) -> str:
    """A model name as one path component: 'org/model' -> 'org--model'."""
    return name.replace("/", "--")


def _module_path(dotted: str) -> Path | None:
    base = PACKAGE.joinpath(*dotted.split(".")) if dotted else PACKAGE
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


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
        if path in seen:
            continue
        seen[path] = None
        for pkg, names in _IMPORT.findall(path.read_text()):
            pkg = pkg.lstrip(".")
            found = [_module_path(f"{pkg}.{n.strip()}".lstrip(".")) for n in names.split(",")]
            found = [f for f in found if f is not None] or [_module_path(pkg)]
            todo.extend(f for f in found if f is not None)
    out = sorted(seen)
    if root is not None:
        out = [
            p.relative_to(Path(root).resolve()) if p.is_relative_to(Path(root).resolve()) else p
            for p in out
        ]
    return [str(p) for p in out]
