"""The package's shape: no import circle, and no module past the size that says it holds
several ideas.

Imports are read the way the rules' code inputs read them (:mod:`attnlab.sources`): every
``attnlab`` import in a file, at the top or inside a function.
"""

from attnlab.sources import PACKAGE, _imported_modules

MAX_LINES = 400


def _modules() -> dict[str, list[str]]:
    """Each module of the package (path inside it) -> the package modules it imports."""
    return {
        str(path.relative_to(PACKAGE)): [
            str(m.relative_to(PACKAGE)) for m in _imported_modules(path) if m != path
        ]
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _cycle_through(start: str, graph: dict[str, list[str]]) -> list[str] | None:
    """An import path from ``start`` back to itself, or None."""
    todo, seen = [[start, m] for m in graph[start]], set()
    while todo:
        path = todo.pop()
        if path[-1] == start:
            return path
        if path[-1] not in seen:
            seen.add(path[-1])
            todo += [[*path, m] for m in graph[path[-1]]]
    return None


def test_no_module_imports_itself_back():
    graph = _modules()
    cycles = [" -> ".join(c) for m in graph if (c := _cycle_through(m, graph))]
    assert not cycles, "\n".join(cycles)


def test_the_cycle_check_finds_a_circle():
    graph = {"a.py": ["b.py"], "b.py": ["c.py"], "c.py": ["a.py"], "d.py": ["a.py"]}
    assert _cycle_through("a.py", graph) == ["a.py", "b.py", "c.py", "a.py"]
    assert _cycle_through("d.py", graph) is None


def test_no_module_is_longer_than_the_limit():
    lines = {name: len((PACKAGE / name).read_text().splitlines()) for name in _modules()}
    assert not {name: n for name, n in lines.items() if n > MAX_LINES}


# Modules that run a model or its attention: a figure reads a table, never these.
MODEL_MODULES = {"attention.py", "models.py", "induction.py", "intervention.py", "capture.py"}


def _reached(start: str, graph: dict[str, list[str]]) -> set[str]:
    todo, seen = [start], set()
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_figures_read_tables_and_the_library_does_not_import_the_snakefile_helper():
    graph = _modules()
    plots = {m: _reached(m, graph) & MODEL_MODULES for m in graph if m.startswith("plots/")}
    assert not {m: sorted(r) for m, r in plots.items() if r}
    assert not [m for m in graph if "workflow.py" in _reached(m, graph)]


def test_the_readme_is_short_and_the_docs_keep_no_history():
    """README for users in at most 250 lines; no history in README, docs or results READMEs
    (git log holds it)."""
    import re

    repo = PACKAGE.parents[1]
    assert len((repo / "README.md").read_text().splitlines()) <= 250
    texts = [repo / "README.md", repo / "RESULTS.md", *sorted((repo / "docs").glob("*.md"))]
    texts += sorted((repo / "results_ref").glob("*/README.md"))
    history = re.compile(r"before this change|since this change|the run before|session", re.I)
    found = {str(p.relative_to(repo)): history.findall(p.read_text()) for p in texts}
    assert not {p: h for p, h in found.items() if h}
