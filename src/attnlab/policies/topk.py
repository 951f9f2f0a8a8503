"""Per-query top-k oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.policies.base import ScoreContext, Selector


@dataclass
class TopK(Selector):
    """Oracle that keeps, for each query, the keys with the largest attention scores.

    It needs the full score row, so it is an upper bound on what a score-based policy
    can keep, not a practical method (the research plan calls it H2O).
    """

    name = "topk"
    label = "top-k oracle"

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """Every key, whole: the exact score row."""
        return 1.0

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.scores  # (B, H, Tq, Tk)
