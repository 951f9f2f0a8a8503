"""XAttention: blocks chosen by antidiagonal scoring (Xu et al., 2025, arXiv:2503.16428)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.policies.base import (
    INF,
    BlockPolicy,
    ScoreContext,
    must_keep_blocks,
    rows_blocks,
)


def antidiagonal_scores(q: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Sums along the antidiagonals of every stride x stride tile of Q K^T.

    q: (B, H, Tq, D), k: (B, H, Tk, D), both starting at position 0. Entry (i, j) is
    sum_s q[i*stride + stride-1-s] . k[j*stride + s]: (B, H, ceil(Tq/S), ceil(Tk/S)).
    Zero-padded rows and keys contribute nothing.
    """

    def strided(x: torch.Tensor) -> torch.Tensor:
        pad = -x.shape[-2] % stride
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)) if pad else x.float()
        return x.view(*x.shape[:2], -1, stride, x.shape[-1])  # (B, H, n, S, D)

    return torch.einsum("bhisd,bhjsd->bhij", strided(q).flip(3), strided(k))


@dataclass
class XAttention(BlockPolicy):
    """The attention scores are summed along antidiagonals of stride x stride tiles (a
    cheap estimate that touches every row and column of a block), softmax-normalised
    over the causal strided keys of each strided query, and summed into ``block_size``
    x ``block_size`` blocks: each query block gets a distribution over key blocks. Key
    blocks are kept in decreasing share until their cumulative share reaches
    ``threshold`` (the rest score -inf) or the budget is met; the query's own block is
    always kept. Queries are the rows seen so far, so a prefill selects per query block.
    """

    name = "xattention"
    needs_query_history = True
    block_size: int = 128
    """Tokens per block."""
    stride: int = 8
    """Antidiagonal stride (8 or 16 in the paper); divides block_size."""
    threshold: float = 0.9
    """Cumulative share of the estimated attention at which selection stops."""
    sink_block: bool = False
    """Always keep the first block."""

    def __post_init__(self) -> None:
        if self.block_size % self.stride or not 0 < self.threshold <= 1:
            raise TypeError("stride must divide block_size and threshold lie in (0, 1]")

    def shares(self, q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
        """Estimated attention share of each key block per query block: (B, H, Mq, Mk).

        q: (B, H, Tq, D) every query so far, k: (B, H, Tk, D), Tq <= Tk, both from 0.
        """
        s = self.stride
        est = antidiagonal_scores(q, k, s) * scaling / s  # mean over the antidiagonal
        n_q, n_k = est.shape[-2:]
        causal = (
            torch.arange(n_k, device=est.device) <= torch.arange(n_q, device=est.device)[:, None]
        )
        probs = torch.softmax(est.masked_fill(~causal, float("-inf")), dim=-1)
        # a strided query is real if its first token exists; pad strided rows weigh 0
        real = (torch.arange(n_q, device=est.device) * s < q.shape[-2]).float()
        per = self.block_size // s
        mq, mk = -(-n_q // per), -(-n_k // per)
        probs = torch.nn.functional.pad(
            probs * real[:, None], (0, mk * per - n_k, 0, mq * per - n_q)
        )
        blocks = probs.view(*probs.shape[:2], mq, per, mk, per).sum((3, 5))
        return blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-12)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.q_all[..., : ctx.k.shape[-2], :]
        share = self.shares(q, ctx.k, ctx.scaling)  # (B, H, Mq, Mk)
        order = share.sort(dim=-1, descending=True)
        before = order.values.cumsum(-1) - order.values  # share of the blocks ranked above
        needed = torch.zeros_like(share, dtype=torch.bool).scatter_(
            -1, order.indices, before < self.threshold
        )
        score = torch.where(needed, share, -INF)
        score = score[:, :, rows_blocks(ctx.q_pos, self.block_size), :]  # (B, H, Tq, Mk)
        return must_keep_blocks(score, ctx.q_pos, self)
