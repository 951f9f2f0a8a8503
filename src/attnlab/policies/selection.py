"""Selection under a per-row budget, from scores to a keep-mask: the one place every
policy's choice is made (:func:`attnlab.policies.base.keep_mask` calls these). Token
scores keep each row's ``budget`` best visible keys; block scores keep whole key blocks in
score order while their visible keys fit; an evicting cache drops keys row by row and
never re-admits one. Must-keep entries score +inf and are kept whatever the budget.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.blocks import block_of, visible_per_block

INF = float("inf")


def select_tokens(score: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the ``budget`` best visible keys and every +inf key.

    score: (B, H, Tq, Tk); visible: broadcastable bool; budget: (B, 1 or H, Tq) long.
    Returns a (B, H, Tq, Tk) bool keep-mask.
    """
    s = torch.where(visible, score.float(), -INF)
    n_inf = int((s == INF).sum(-1).max())
    kk = min(max(int(budget.max()), n_inf), s.shape[-1])
    top_val, top_idx = s.topk(kk, dim=-1)  # (B, H, Tq, kk)
    rank = torch.arange(kk, device=s.device)
    keep_top = (rank < budget.unsqueeze(-1)) | (top_val == INF)
    keep_top &= top_val > -INF
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return mask.scatter_(-1, top_idx, keep_top)


def keep_blocks_by_budget(
    score: torch.Tensor, count: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Keep, per row, key blocks in score order while their visible keys fit the budget.

    score: (B, H, Tq, Mk) with +inf for must-keep blocks; count: (B, 1|H, Tq, Mk) visible
    keys per block; budget: (B, 1|H, Tq). The best visible block is always kept, so no row
    is left empty; must-keep blocks are kept whatever the budget. Returns (B, H, Tq, Mk).
    """
    s = score.float().masked_fill(count == 0, -INF)
    order = s.argsort(dim=-1, descending=True, stable=True)  # (B, H, Tq, Mk)
    s_sorted = s.gather(-1, order)
    c_sorted = count.expand_as(s).gather(-1, order)
    fits = c_sorted.cumsum(-1) <= budget.unsqueeze(-1)
    fits[..., 0] = True
    keep_sorted = (fits | (s_sorted == INF)) & (s_sorted > -INF)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def keep_block_tokens_by_budget(
    score: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor, block_size: int
) -> torch.Tensor:
    """:func:`keep_blocks_by_budget` at token resolution: a (B, H, Tq, Tk) bool mask of the
    kept blocks' keys inside ``visible``."""
    keep = keep_blocks_by_budget(score, visible_per_block(visible, block_size), budget)
    return keep.repeat_interleave(block_size, dim=-1)[..., : visible.shape[-1]] & visible


def select_evicting(
    score: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor, kept: torch.Tensor | None
) -> torch.Tensor:
    """:func:`select_tokens` with eviction memory, row after row: a row's candidates are
    the keys no earlier row (nor ``kept``, the cache before these rows) dropped, and a row
    over its budget drops its lowest-scoring candidates that are not must-keep.

    score: (B, H, Tq, Tk) for rows at positions Tk - Tq .. Tk - 1; visible: broadcastable
    bool; budget: (B, 1 or H, Tq); kept: (B, H, Tp) bool, Tp <= Tk, or None (no key dropped
    yet). Returns a (B, H, Tq, Tk) bool keep-mask; its last row is the cache afterwards.
    """
    b, h, tq, tk = score.shape
    vis = visible.expand(b, h, tq, tk)
    alive = torch.ones(b, h, tk, dtype=torch.bool, device=score.device)
    if kept is not None:
        alive[..., : kept.shape[-1]] = kept
    if tq == 1:
        return select_tokens(score, vis & alive.unsqueeze(-2), budget)
    # Rows one at a time on the host: each drops at most a key or two, so a loop of small
    # numpy steps beats a top-k per row.
    s = score.detach().float().cpu().numpy().reshape(b * h, tq, tk)
    v = vis.cpu().numpy().reshape(b * h, tq, tk)
    bud = budget.expand(b, h, tq).cpu().numpy().reshape(b * h, tq)
    live = alive.cpu().numpy().reshape(b * h, tk)
    out = np.zeros((b * h, tq, tk), dtype=bool)
    rows = np.arange(b * h)
    for i in range(tq):
        cand = live & v[:, i]
        over = cand.sum(-1) - bud[:, i]  # (BH,) candidates beyond the budget
        while (over > 0).any():
            r = np.where(cand, s[:, i], np.inf)  # must-keep (+inf) never goes
            j = r.argmin(-1)
            drop = (over > 0) & (r[rows, j] < np.inf)
            if not drop.any():
                break
            cand[rows[drop], j[drop]] = False
            live[rows[drop], j[drop]] = False
            over = over - drop
        out[:, i] = cand
    return torch.from_numpy(out).view(b, h, tq, tk).to(score.device)


def alive_keys(kept: torch.Tensor, tk: int) -> torch.Tensor:
    """An evicting cache's keys among ``tk``: ``kept`` (B, H, Tp) and every key after it
    (not yet seen by the eviction) -> (B, H, 1, Tk) bool."""
    alive = torch.ones(*kept.shape[:2], 1, tk, dtype=torch.bool, device=kept.device)
    alive[..., 0, : kept.shape[-1]] = kept
    return alive


def prune_top_p(keep: torch.Tensor, scores: torch.Tensor, p: float) -> torch.Tensor:
    """Twilight's pruning (arXiv:2502.02770): of each row's ``keep`` keys, the fewest
    whose share of the row's attention over those keys reaches ``p``, the largest first.

    keep: (B, 1 or H, Tq, Tk) bool; scores: (B, H, Tq, Tk) the rows' scaled logits.
    Returns a (B, H, Tq, Tk) bool mask within ``keep``; a row keeping nothing stays so.
    """
    keep = keep.expand_as(scores)
    order = scores.float().masked_fill(~keep, -INF).sort(dim=-1, descending=True)
    share = torch.softmax(order.values, dim=-1)  # over the kept keys alone
    before = share.cumsum(-1) - share  # the share of the keys ranked above each
    needed = torch.zeros_like(keep).scatter_(-1, order.indices, before < p)
    return keep & needed


def twilight(policy) -> bool:
    """Whether ``policy`` prunes its budget's keys to its ``top_p`` after choosing them
    (:class:`~attnlab.policies.base.Selector`; two-stage prunes inside its own score)."""
    return bool(getattr(policy, "top_p", 0.0)) and not policy.prunes_itself


def must_keep_blocks(q_pos: torch.Tensor, mk: int, policy, ctx=None) -> torch.Tensor:
    """The key blocks a block policy keeps whatever their score: the query's own block
    and block 0, where the ``policy`` (a BlockPolicy) asks for them (its ``keep_diagonal``,
    ``sink_block``).
    q_pos: (Tq,) -> (Tq, Mk) bool; with ``ctx`` (a ScoreContext) made once per ``q_pos``
    tensor and mask (every layer's selection of a prefill reads the same rows)."""

    def make():
        own = block_of(q_pos, policy.block_size).unsqueeze(-1)  # (Tq, 1)
        blocks = torch.arange(mk, device=q_pos.device)
        must = torch.zeros(own.shape[0], mk, dtype=torch.bool, device=q_pos.device)
        if policy.keep_diagonal:
            must |= blocks == own
        if policy.sink_block:
            must |= blocks == 0
        return q_pos, must

    if ctx is None:
        return make()[1]
    flags = (policy.block_size, policy.keep_diagonal, policy.sink_block)
    return ctx.cached(("must keep", id(q_pos), mk, flags), make)[1]


def with_must_keep_blocks(
    score: torch.Tensor, q_pos: torch.Tensor, policy, ctx=None, in_place: bool = False
) -> torch.Tensor:
    """Set +inf on the query's own block and block 0 where the policy asks for them
    (:func:`must_keep_blocks`). score: (B, H, Tq, Mk) block scores of the rows at
    positions q_pos. ``in_place``: ``score`` is the caller's own new tensor and every
    row's own block lies among its Mk (a prefill's), so only those entries are written
    (a fused prefill's 2048 x 2048 grid per head is not read and rewritten)."""
    if not (in_place and score.is_contiguous()):
        return score.masked_fill(must_keep_blocks(q_pos, score.shape[-1], policy, ctx), INF)

    def make():  # the flat (row, block) entries
        rows = torch.arange(q_pos.shape[0], device=q_pos.device) * score.shape[-1]
        own = block_of(q_pos, policy.block_size)
        cols = [own] * policy.keep_diagonal + [torch.zeros_like(own)] * policy.sink_block
        return q_pos, torch.cat([rows + c for c in cols]) if cols else own[:0]

    flags = (policy.block_size, policy.keep_diagonal, policy.sink_block, score.shape[-1])
    key = ("must keep at", id(q_pos), flags)
    at = (make() if ctx is None else ctx.cached(key, make))[1]
    # index_fill_ takes the value as a number (an indexed assignment would copy it to
    # the device and wait there)
    score.view(*score.shape[:-2], -1).index_fill_(-1, at, INF)
    return score
