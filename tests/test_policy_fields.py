"""A policy is one module: its dataclass's fields are its parameter schema, read from the
source (for the workflow) exactly as Python builds them (for the runs)."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab import policies
from attnlab.errors import UserError
from attnlab.policies import fields
from attnlab.policies.fields import REQUIRED


def _runtime_fields(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


@pytest.mark.parametrize("name", sorted(fields.registry()))
def test_source_fields_are_the_dataclass_fields(name):
    info = fields.registry()[name]
    cls = policies.policy_class("kvpress:KnormPress" if name == "kvpress" else name)
    assert {k: f.default for k, f in info.fields.items()} == _runtime_fields(cls)
    assert (info.label, info.level) == (cls.label, cls.level) and info.label
    # a block size only where the policy ranks blocks
    assert ("block_size" in info.fields) == (cls.level == "block")


def test_make_checks_each_value_against_its_field_in_one_line():
    cases = {
        "must be <= 1, got 1.5": {"lam": 1.5},
        "graph must be one of 'symmetric', 'directed', 'rowsum'": {"graph": "dense"},
        "block_size must be integer, got True": {"block_size": True},
        "has no parameter 'lamda' (it has: top_p, block_size, keep_diagonal": {"lamda": 0.5},
    }
    for message, params in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
            policies.make("cab", **params)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="'h2o' has no parameter 'block_size'"):
        policies.make("h2o", block_size=16)
    assert policies.make("cab", base="cab", lam=0.3).lam == 0.3


def test_labels_name_variants_by_their_base():
    assert fields.label("cab_lam30") == "CAB λ=0.3"
    assert fields.label("cab_b64") == "CAB (b64)"
    assert fields.label("coarse_magnitude") == "coarse magnitude (λ=0)"
    assert fields.label("kvpress:KnormPress") == "kvpress:KnormPress"


def test_a_new_policy_is_its_module_alone(tmp_path):
    """A dataclass in a new module of a copy of the package is listed, checked and built,
    with nothing else edited."""
    src = Path(policies.__file__).resolve().parents[1]
    shutil.copytree(src, tmp_path / "attnlab", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "attnlab/policies/every_other.py").write_text(
        '''"""Keeps every other key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from attnlab.policies.base import Policy, ScoreContext
from attnlab.policies.fields import Range


@dataclass
class EveryOther(Policy):
    """Every other key."""

    name = "every_other"
    label = "every other key"
    phase: Annotated[int, Range(0, 1)] = 0
    """Which keys: even (0) or odd (1)."""
    mode: Literal["a", "b"] = "a"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ((ctx.key_pos % 2) == self.phase).float().expand(*ctx.q.shape[:3], -1)
'''
    )
    code = (
        "from attnlab import policies; from attnlab.policies import fields;"
        "p = policies.make('every_other', phase=1);"
        "print(type(p).__name__, p.phase, p.mode, fields.label('every_other'));"
        "fields.check('every_other', {'phase': 2})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert "EveryOther 1 a every other key" in proc.stdout, proc.stderr
    assert "every_other': phase must be <= 1, got 2" in proc.stderr
