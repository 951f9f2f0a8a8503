"""Quest: query-aware page selection (Tang et al., 2024, arXiv:2406.10774)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.blocks import n_blocks
from attnlab.policies.base import BlockPolicy, ScoreContext
from attnlab.policies.fields import Range
from attnlab.policies.selection import INF, with_must_keep_blocks


def page_bounds(
    k: torch.Tensor, page: int, float32: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum of the keys of each page: k (B, H, T, D) ->
    two (B, H, P, D) tensors, float32 or (``float32`` False) the keys' own dtype; the
    last page may be ragged."""
    b, h, t, d = k.shape
    n = n_blocks(t, page)
    pad = n * page - t
    # the extremes in the keys' own dtype, then float32: exact (a minimum is one of the
    # values), and no float32 copy of every key
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")) if pad else k
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")) if pad else k
    lo, hi = lo.view(b, h, n, page, d).amin(3), hi.view(b, h, n, page, d).amax(3)
    return (lo.float(), hi.float()) if float32 else (lo, hi)


def upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """sum_d max(q_d * min_d, q_d * max_d) for every (query, page): (B, H, Tq, P).

    For q_d >= 0 the larger product is q_d * max_d, else q_d * min_d, so the bound is
    two matrix products rather than a (Tq, P, D) tensor.
    """
    qf = q.float()
    pos = qf.clamp(min=0)
    return pos @ kmax.transpose(-1, -2) + (qf - pos) @ kmin.transpose(-1, -2)


def candidate_pages(q, k, page: int, keys: torch.Tensor, excluded=None, forced=None):
    """Quest as a first stage: each row's pages of largest bound (:func:`upper_bound`),
    as many as hold ``keys`` (B, 1|H, Tq) keys, among the pages not ``excluded``, the
    ``forced`` ones ranked first (both bool, broadcastable to (B, H, Tq, P)).
    q: (B, H, Tq, D), k: (B, H, T, D) -> (B, H, Tq, P) bool."""
    bound = upper_bound(q, *page_bounds(k, page))
    if excluded is not None:
        bound = bound.masked_fill(excluded, -INF)
    if forced is not None:
        bound = bound.masked_fill(forced, INF)
    n = torch.ceil(keys.float() / page).long()
    top = bound.topk(min(int(n.max()), bound.shape[-1]), dim=-1)
    kept = (torch.arange(top.indices.shape[-1], device=q.device) < n.unsqueeze(-1)) & (
        top.values > -INF
    )
    return torch.zeros_like(bound, dtype=torch.bool).scatter_(-1, top.indices, kept)


@dataclass
class Quest(BlockPolicy):
    """Keys grouped in pages of ``block_size`` tokens; each page carries the per-channel
    minimum and maximum of its keys, and a query scores a page by the upper bound
    sum_d max(q_d min_d, q_d max_d) of its dot product with any key of the page. Each
    query keeps its top pages within the budget. The query's own page, still being
    written, is always kept (as Quest attends to it in full). ``dense_layers`` leaves the
    first layers dense, as the paper does for its first two (their attention is too
    spread for page selection); the achieved sparsity then counts those layers' keys.
    """

    name = "quest"
    label = "Quest"
    prefill_extension = True
    sink_block: bool = False
    """Always keep the first page (block_size: tokens per page)."""
    dense_layers: Annotated[int, Range(0)] = 0
    """Leading layers left dense (the paper's setting: 2)."""
    window_layers: bool = True
    """Act in the model's sliding-window layers too (False: the global layers only, the
    window layers left to the model's own kernel under their window, as a method written
    for full-attention layers runs on a hybrid model; the achieved sparsity counts the
    windows' keys)."""

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """Two vectors (the channel-wise minimum and maximum) per page of ``block_size``
        keys."""
        return 2 / self.block_size

    def score(self, ctx: ScoreContext) -> torch.Tensor | None:
        if ctx.layer < self.dense_layers:
            return None
        g = ctx.groups  # the bounds of each key/value head, then its query heads'
        # the fused prefill's kernel takes the extremes in the keys' dtype (exact products)
        bounds = page_bounds(ctx.k[:, ::g], self.block_size, float32=not ctx.triton)
        if ctx.triton:  # the same bound from the tensor cores, on each row's band alone
            from attnlab.kernels.quest import page_bound

            bound = page_bound(ctx.q, *bounds, bands=self._bands(ctx))
        else:
            bound = upper_bound(ctx.q, *(b.repeat_interleave(g, 1) for b in bounds))
        return with_must_keep_blocks(bound, ctx.q_pos, self, ctx, in_place=ctx.triton)

    def _bands(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A fused prefill's rows (one per query block): the first and last page each can
        keep (its window's edge, its own page), outside which its bounds are never read;
        None where the rows are not one per query block."""
        first = ctx.first_blocks
        if first is None or first.shape[-1] != ctx.q.shape[-2]:
            return None
        own = lambda: (ctx.q_pos, ctx.q_pos // self.block_size)  # noqa: E731
        return first, ctx.cached(("own page", id(ctx.q_pos), self.block_size), own)[1]
