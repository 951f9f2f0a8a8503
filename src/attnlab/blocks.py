"""Block arithmetic shared by the policies, the kernels and the runtime.

A block is ``block_size`` consecutive tokens; a sequence of n tokens has
``n_blocks(n, block_size)`` of them, the last one possibly ragged. These helpers return
counts and indices of blocks, never token budgets (see :func:`attnlab.policies.base.row_budget`).
"""

from __future__ import annotations

import torch


def ceil_div(a: int, b: int) -> int:
    """The smallest integer >= a / b, for positive b."""
    return -(-a // b)


def n_blocks(n: int, block_size: int) -> int:
    """Blocks covering n tokens (the last one ragged when block_size does not divide n)."""
    return ceil_div(n, block_size)


def block_of(pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The block each token position falls in: (...) long -> (...) long."""
    return torch.div(pos, block_size, rounding_mode="floor")


def visible_per_block(visible: torch.Tensor, block_size: int) -> torch.Tensor:
    """Visible keys in each key block: (B, 1|H, Tq, Tk) bool -> (B, 1|H, Tq, Mk) long."""
    mk = n_blocks(visible.shape[-1], block_size)
    pad = mk * block_size - visible.shape[-1]
    vis = torch.nn.functional.pad(visible, (0, pad)) if pad else visible
    return vis.view(*vis.shape[:-1], mk, block_size).sum(-1)


def expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: (B, Hkv, ., D) -> (B, H, ., D)."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def visible_block_pairs(visible: torch.Tensor, block_size: int) -> torch.Tensor:
    """Visible (query, key) pairs in each (query block, key block) of a prefill: (T, T)
    bool -> (Mq, Mk) long, in row chunks of 1024 so no (T, T) integer tensor is made."""
    t = visible.shape[0]
    m = n_blocks(t, block_size)
    pairs = torch.zeros(m, m, dtype=torch.long, device=visible.device)
    for lo in range(0, t, 1024):
        rows = visible[lo : lo + 1024]
        counts = visible_per_block(rows, block_size)  # (rows, Mk)
        idx = torch.arange(lo, lo + rows.shape[0], device=visible.device) // block_size
        pairs.index_add_(0, idx, counts)
    return pairs


def causal_block_pairs(t: int, block_size: int, device=None) -> torch.Tensor:
    """:func:`visible_block_pairs` of a plain causal prefill of t tokens, by formula (no
    (T, T) mask): a query block of r rows sees r * block_size pairs in each earlier key
    block and r (r + 1) / 2 in its own. Returns (Mq, Mk) long."""
    m = n_blocks(t, block_size)
    rows = (t - torch.arange(m, device=device) * block_size).clamp(max=block_size)  # (M,)
    below = torch.ones(m, m, dtype=torch.bool, device=device).tril(-1)
    pairs = below * (rows[:, None] * block_size)
    return pairs + torch.diag(rows * (rows + 1) // 2)
