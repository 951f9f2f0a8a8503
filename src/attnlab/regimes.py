"""The two regimes a policy acts in (docs/regimes.md), as objects.

A regime decides where a policy acts and what a run records; every module asks its
regime instead of comparing names:

- ``cache`` (KV-cache compression): the prompt's prefill is the model's own dense
  attention (``dense_prefill``), which hands each policy what it needs (earlier queries,
  received attention, an evicted cache); each generated token then sees the cached keys
  its policy keeps, so the policy acts on every call after the prefill, and the recall is
  recorded at every generated token's row. A block policy chooses per row, causally.
- ``prefill`` (sparse prefill): every prompt row runs under the policy, and the decode
  steps are dense unless the run asks for ``decode="policy"``; the recall is recorded at
  a layer's first call (the prompt's last row answers). A block policy chooses once per
  query block, in its selection form (:func:`attnlab.policies.base.selection_form`).

The tables keep the regime's ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.errors import UserError
from attnlab.policies.base import Policy, selection_form


@dataclass(frozen=True)
class Regime:
    """Where a policy acts and what is recorded (see the module docstring)."""

    name: str
    dense_prefill: bool  # the prompt's prefill is the model's own; the policy acts after it

    def acts(self, first_call: bool, decode: str) -> bool:
        """Whether the policy acts on a layer's call: its first call is the prompt's
        prefill; ``decode``: a prefill-regime run's decode steps ("dense" or "policy")."""
        if first_call:
            return not self.dense_prefill
        return self.dense_prefill or decode == "policy"

    def records_recall(self, first_call: bool) -> bool:
        """Whether an answering row's recall is recorded on this call of a layer: every
        generated token's (``cache``), the prompt's last row only (``prefill``)."""
        return self.dense_prefill or first_call

    def selection(self, policy: Policy, whole_prompt: bool) -> str:
        """How a block policy's prefill chooses: ``causal`` (per row or by a query block's
        first row) or ``prompt`` (:func:`~attnlab.policies.base.selection_form`)."""
        return "causal" if self.dense_prefill else selection_form(policy, whole_prompt)

    def decode_mode(self, decode: str) -> str:
        """The decode steps' attention as the tables record it: under the policy in the
        ``cache`` regime, else the run's ``decode``."""
        return "policy" if self.dense_prefill else decode

    def extends(self, policy: Policy) -> bool:
        """Whether this regime runs the policy beyond its paper (a cache-compression
        method's sparse prefill: ``prefill_extension``)."""
        return not self.dense_prefill and policy.prefill_extension

    def __str__(self) -> str:
        return self.name


CACHE = Regime("cache", dense_prefill=True)
PREFILL = Regime("prefill", dense_prefill=False)
REGIMES = {r.name: r for r in (CACHE, PREFILL)}


def named(name: str) -> Regime:
    """The regime a job's ``--regime`` names, or one line naming the regimes there are."""
    try:
        return get(name)
    except ValueError:
        raise UserError(f"--regime must be one of {', '.join(REGIMES)}, got {name!r}") from None


def get(regime: str | Regime) -> Regime:
    """The regime named ``regime`` (a :class:`Regime` is returned as is)."""
    if isinstance(regime, Regime):
        return regime
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {tuple(REGIMES)}, got {regime!r}")
    return REGIMES[regime]
