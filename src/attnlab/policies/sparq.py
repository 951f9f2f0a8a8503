"""SparQ Attention: scores estimated from the query's largest channels (Ribar et al., 2023,
arXiv:2312.04985)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.policies.base import ScoreContext, Selector
from attnlab.policies.fields import Range


@dataclass
class SparQ(Selector):
    """Each row reads only the ``r`` channels where its query is largest in magnitude and
    estimates every key's score from them (q[i] . k[i] over those channels), then keeps
    the keys of largest estimate under the budget; attention over them is exact. The
    paper's softmax temperature on the estimate does not change its ranking and is left
    out; its mean-value reallocation (the dropped keys' weight given to the mean value)
    changes the output, not the choice, and is not applied: attnlab policies choose keys.
    """

    name = "sparq"
    label = "SparQ"
    channels: Annotated[float, Range(0, 1)] = 0.125
    """Share of the head's channels the estimate reads (r / head_dim; the paper's 1/8)."""

    def rank(self, head_dim: int) -> int:
        """r: the channels the estimate reads."""
        return max(1, min(head_dim, round(self.channels * head_dim)))

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """Share of the keys' bytes a row reads to choose: r of each key's head_dim channels."""
        return self.rank(head_dim) / head_dim

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.q.float()  # (B, H, Tq, D)
        top = q.abs().topk(self.rank(q.shape[-1]), dim=-1).indices  # (B, H, Tq, r)
        q_r = torch.zeros_like(q).scatter_(-1, top, q.gather(-1, top))  # only those channels
        est = torch.einsum("bhqd,bhkd->bhqk", q_r, ctx.k.float())  # (B, H, Tq, Tk)
        return torch.where(ctx.visible, est, -torch.inf)
