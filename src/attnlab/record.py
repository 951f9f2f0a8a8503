"""The machinery of a job record (:mod:`attnlab.jobs` holds the records): a frozen
dataclass whose fields are settings, read from the validated config at a dotted key, or
given per job; each value checked against its field's type when the record is made."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from attnlab.errors import UserError


def setting(key: str) -> Any:
    """A field read from the validated config at the dotted ``key``."""
    return field(metadata={"setting": key})


def given(help: str, default: Any = MISSING) -> Any:
    """A field each job gives (a file, a wildcard's value); ``default``: what a job that
    does not give it runs with (None: the field may be absent)."""
    return field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class Job:
    """A verb's record; every field is checked against its type when it is made."""

    command: ClassVar[str] = ""

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "command" in cls.__dict__:  # a verb's record, not a shared part
            RECORDS[cls.command] = cls

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(hints[f.name], getattr(self, f.name))
            if value is _BAD:
                got = getattr(self, f.name)
                raise UserError(
                    f"{self.command}: {flag(f.name)} must be {_name(hints[f.name])}, got {got!r}"
                )
            object.__setattr__(self, f.name, value)

    @classmethod
    def make(cls, values: dict) -> Job:
        """The record of ``values``: one line naming any required field missing, or any
        field the record does not have."""
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - names):
            raise UserError(f"{cls.command}: no such field {', '.join(map(flag, unknown))}")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if missing := [n for n in required if values.get(n) is None]:
            raise UserError(f"{cls.command} needs {', '.join(map(flag, missing))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def settings(cls, config: dict, given: dict) -> dict:
        """Every setting that ``given`` does not hold, from the validated ``config``."""
        out = {}
        for f in fields(cls):
            key = f.metadata.get("setting")
            if key and f.name not in given:
                try:
                    key = key.format(**given)
                except KeyError:  # it reads a field not given: make() names that one
                    continue
                out[f.name] = lookup(config, key)
        return out


_BAD = object()
RECORDS: dict[str, type[Job]] = {}  # command -> its record, as each is defined


def _name(hint) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(hint, value):
    """``value`` as ``hint`` (an int where a float is asked, a tuple where a list), or _BAD."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if (out := _coerce(arm, value)) is not _BAD:
                return out
        return _BAD
    if hint is type(None):
        return None if value is None else _BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _BAD
        out = [_coerce(args[0], v) for v in value]
        return _BAD if any(v is _BAD for v in out) else out
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)):
        return _BAD if hint is int and isinstance(value, bool) else value
    return _BAD


def lookup(config: dict, key: str):
    """The value at a dotted ``key`` of the validated config (``policy_params.<name>``:
    a policy's parameters, which the effective config holds for the policies the grids
    use, :func:`attnlab.workflow.policy_params`)."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"config has no key {key}")
        node = node[part]
    return node
