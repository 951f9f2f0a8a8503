"""Full attention: the reference every sparse policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.policies.base import Policy, ScoreContext


@dataclass
class Full(Policy):
    """Keeps every key the model itself lets a query see (sparsity 0)."""

    name = "full"
    label = "full attention"

    def score(self, ctx: ScoreContext) -> None:
        return None
