"""Each policy's parameters, read from its dataclass's source without importing it.

A policy is one module of this package: a dataclass whose ``name`` is its registry name,
whose ``label`` is its name in figures, and whose fields are its hyper-parameters. A
field's annotation (``int``, ``float``, ``bool``, ``str``, ``dict``, a ``Literal`` of the
allowed values, or one of these ``Annotated`` with a :class:`Range`), its default and
the docstring under it are its whole schema: the workflow checks the config's
``policies`` entries against it before any job runs (reading source, so Snakemake never
imports torch), and :func:`attnlab.policies.make` checks the same before it builds one.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from attnlab.errors import UserError

HERE = Path(__file__).resolve().parent
REQUIRED = object()  # a field without a default
_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "dict": "object"}
_PYTHON = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "string": (str,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, inclusive (``Annotated[float, Range(0, 1)]``)."""

    minimum: float | None = None
    maximum: float | None = None


@dataclass
class Field:
    """One hyper-parameter: its JSON type, allowed values, bounds, default and docstring."""

    name: str
    type: str
    default: object = REQUIRED
    doc: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed here, or None."""
        if isinstance(value, bool) and self.type in ("integer", "number"):
            return f"must be {self.type}, got {value!r}"
        if not isinstance(value, _PYTHON[self.type]):
            return f"must be {self.type}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum:g}, got {value!r}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum:g}, got {value!r}"
        return None

    def describe(self) -> str:
        """The field's type, allowed values and default in a few words."""
        kind = " | ".join(map(repr, self.choices)) if self.choices else self.type
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            kind += f" in [{lo:g}, {hi:g}]"
        elif lo is not None or hi is not None:
            kind += f" >= {lo:g}" if lo is not None else f" <= {hi:g}"
        default = "required" if self.default is REQUIRED else f"default {self.default!r}"
        return f"{kind}, {default}"


@dataclass
class PolicyClass:
    """A policy dataclass as its source declares it."""

    cls: str
    module: str
    bases: list[str]
    attrs: dict = field(default_factory=dict)  # class attributes (name, label, level, ...)
    own: dict[str, tuple] = field(default_factory=dict)  # its own fields, as source nodes
    doc: str = ""


def _type(node: ast.expr, where: str) -> dict:
    """A field annotation -> its Field keywords (type, choices, bounds)."""
    if isinstance(node, ast.Name) and node.id in _TYPES:
        return {"type": _TYPES[node.id]}
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if node.value.id == "Literal":
            choices = tuple(ast.literal_eval(a) for a in args)
            kind = _TYPES[type(choices[0]).__name__]
            return {"type": kind, "choices": choices}
        if node.value.id == "Annotated" and isinstance(args[1], ast.Call):
            bounds = [ast.literal_eval(a) for a in args[1].args]
            bounds += [None] * (2 - len(bounds))
            keywords = {k.arg: ast.literal_eval(k.value) for k in args[1].keywords}
            return {**_type(args[0], where), "minimum": bounds[0], "maximum": bounds[1], **keywords}
    raise TypeError(f"{where}: unsupported annotation {ast.unparse(node)}")


def _default(node: ast.expr | None):
    if node is None:
        return REQUIRED
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        kw = {k.arg: k.value for k in node.keywords}
        if "default" in kw:
            return ast.literal_eval(kw["default"])
        factory = getattr(kw.get("default_factory"), "id", None)
        return {"dict": {}, "list": [], "tuple": ()}[factory]
    return ast.literal_eval(node)


def _is_classvar(node: ast.expr) -> bool:
    target = node.value if isinstance(node, ast.Subscript) else node
    return isinstance(target, ast.Name) and target.id == "ClassVar"


def _classes(path: Path) -> list[PolicyClass]:
    """The dataclasses a policy module declares."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ClassDef) or not any(
            getattr(d, "id", getattr(getattr(d, "func", None), "id", None)) == "dataclass"
            for d in node.decorator_list
        ):
            continue
        pc = PolicyClass(node.name, path.stem, [getattr(b, "id", "") for b in node.bases])
        pc.doc = ast.get_docstring(node) or ""
        body = node.body
        for i, stmt in enumerate(body):
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                doc = " ".join(str(nxt.value.value).split())
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                pc.attrs[stmt.targets[0].id] = _literal(stmt.value)
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                if _is_classvar(stmt.annotation):
                    pc.attrs[name] = _literal(stmt.value)
                elif not name.startswith("_"):
                    pc.own[name] = (stmt.annotation, stmt.value, doc, f"{path.name}: {node.name}")
        out.append(pc)
    return out


def _literal(node: ast.expr | None):
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None


@cache
def _all_classes() -> dict[str, PolicyClass]:
    found = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem not in ("__init__", "fields"):
            found.update({pc.cls: pc for pc in _classes(path)})
    return found


def _lineage(cls: str) -> list[PolicyClass]:
    """A class and the package classes it derives from, the most basic first."""
    classes = _all_classes()
    pc = classes[cls]
    parents = [c for b in pc.bases if b in classes for c in _lineage(b)]
    return list({c.cls: c for c in [*parents, pc]}.values())  # each class once


@dataclass
class PolicyInfo:
    """A registered policy: its name, class, module, label, level and every field."""

    name: str
    cls: str
    module: str
    label: str
    level: str
    fields: dict[str, Field]
    doc: str


@cache
def registry() -> dict[str, PolicyInfo]:
    """Every policy of the package by name: each dataclass that sets its own ``name``
    (``kvpress``, reached as ``kvpress:<Press>``, among them)."""
    out = {}
    for pc in _all_classes().values():
        name = pc.attrs.get("name")
        if not name or name == "base":
            continue
        attrs, fields = {}, {}
        for c in _lineage(pc.cls):
            attrs.update(c.attrs)
            for key, (annotation, value, doc, where) in c.own.items():
                kw = _type(annotation, f"{where}.{key}")
                fields[key] = Field(key, default=_default(value), doc=doc, **kw)
        label = attrs.get("label") or name
        out[name] = PolicyInfo(
            name, pc.cls, pc.module, label, attrs.get("level", "token"), fields, pc.doc
        )
    return out


def names() -> list[str]:
    """The registered policies' names, as a config names them (the kvpress policy as
    ``kvpress:<Name>Press``)."""
    return [n if n != "kvpress" else "kvpress:<Name>Press" for n in registry()]


def info(name: str) -> PolicyInfo:
    """The registered policy ``name`` (``kvpress:<Press>``: the kvpress policy); an unknown
    one raises a one-line UserError naming the known ones."""
    reg = registry()
    key = "kvpress" if name.startswith("kvpress:") else name
    if key not in reg or name == "kvpress":
        raise UserError(f"unknown policy {name!r}; known: {', '.join(names())}")
    return reg[key]


def check(name: str, params: dict) -> dict:
    """``params`` of the policy ``name`` with its defaults filled in; a parameter it does
    not have, or a value of the wrong type, outside its choices or bounds, raises a
    one-line UserError."""
    fields = info(name).fields
    if name.startswith("kvpress:"):
        fields = {k: f for k, f in fields.items() if k != "press"}
    for key, value in params.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"policy {name!r} has no parameter {key!r} (it has: {known})")
        if (why := fields[key].problem(value)) is not None:
            raise UserError(f"policy {name!r}: {key} {why}")
    if missing := [k for k, f in fields.items() if k not in params and f.default is REQUIRED]:
        raise UserError(f"policy {name!r} needs {', '.join(missing)}")
    return {key: params.get(key, f.default) for key, f in fields.items()}


def describe() -> str:
    """Every policy, its label and level, and each field: type, default, docstring."""
    lines = []
    for name, pi in registry().items():
        shown = "kvpress:<Name>Press" if name == "kvpress" else name
        lines.append(f"{shown} ({pi.label}; {pi.level} level)")
        for f in pi.fields.values():
            if name == "kvpress" and f.name == "press":
                continue
            lines.append(f"  {f.name}: {f.describe()}")
            if f.doc:
                lines.append(f"      {f.doc}")
    return "\n".join(lines)


def show() -> None:
    """``attnlab policies``: print :func:`describe`."""
    print(describe())


def lam_variant(name: str) -> tuple[str, float] | None:
    """``<policy>_lam<percent>`` -> (policy, lambda), e.g. cab_lam30 -> ("cab", 0.3);
    None for any other name."""
    m = re.fullmatch(r"([a-z0-9_]+?)_lam(\d+)", name)
    return (m[1], int(m[2]) / 100) if m else None


def label(name: str) -> str:
    """A policy's name in figures: its class's ``label``; a variant ``<policy>_lam<pct>``
    its base's label and lambda; another ``<policy>_<suffix>`` its base's label and the
    suffix; anything else (a kvpress press) as it is."""
    reg = registry()
    if name in reg:
        return reg[name].label
    if (lam := lam_variant(name)) and lam[0] in reg:
        return f"{reg[lam[0]].label} λ={lam[1]:g}"
    for base in sorted(reg, key=len, reverse=True):
        if name.startswith(base + "_"):
            return f"{reg[base].label} ({name.removeprefix(base + '_')})"
    return name
