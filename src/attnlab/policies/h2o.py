"""H2O: heavy hitters plus a recent window (Zhang et al., 2023, arXiv:2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.policies.base import INF, Policy, ScoreContext
from attnlab.policies.fields import Range


@dataclass
class H2O(Policy):
    """Heavy-Hitter Oracle: keeps the most recent keys and, in the rest of the budget, the
    keys that have received the most attention so far; a key it evicts is gone for good
    (the shared eviction memory), as in the paper's cache. The accumulated attention is
    that of full attention over every query up to the current one.
    """

    name = "h2o"
    label = "H2O"
    needs_received = True
    prefill_extension = True
    evicts = True
    recent_ratio: Annotated[float, Range(0, 1)] = 0.5
    """Share of each row's budget given to the most recent keys."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        recent = torch.ceil(self.recent_ratio * ctx.budget.float()).unsqueeze(-1)  # (B,1|H,Tq,1)
        age = ctx.q_pos.unsqueeze(-1) - ctx.key_pos  # (Tq, Tk)
        return torch.where((age >= 0) & (age < recent), INF, ctx.received)  # (B, H, Tq, Tk)
