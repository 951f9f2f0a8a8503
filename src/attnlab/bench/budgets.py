"""The budgets CAB is timed at: key blocks kept per query block at a target sparsity (the
scored selection's), the blocks every query block keeps, and the token pairs a selection
attends (its density).

A query block is ``q_group`` consecutive key blocks of queries (1: the scored selection;
2 x 64 = 128 tokens is flex's own tile), so ``Mg = ceil(m / q_group)`` query blocks face
``m`` key blocks.
"""

from __future__ import annotations

import torch

from attnlab.blocks import ceil_div
from attnlab.policies.base import row_budget


def scored_blocks_per_query_block(
    n: int, block_size: int, sparsity: float, q_group: int = 1
) -> torch.Tensor:
    """Key blocks kept per query block as the scoring path keeps them (the prefill
    regime's block selection, :meth:`attnlab.sparse.SparseRun.block_selection`): the
    budget of the query block's last row, max(1, round((1 - s) * keys it sees)), in whole
    blocks, at least one. With ``q_group = 1`` and ``block_size`` dividing ``n`` this is
    the count the scored selection keeps (must-keep blocks count toward it); a pooled
    group (``q_group > 1``) takes its last row's budget, a selection no scoring path makes.

    (Mg,) int, Mg = ceil(ceil(n / block_size) / q_group).
    """
    m = ceil_div(n, block_size)
    rows = ((torch.arange(ceil_div(m, q_group)) + 1) * q_group * block_size).clamp(max=n)
    return (row_budget(rows, sparsity) // block_size).clamp(min=1).to(torch.int32)


def must_keep_mask(m: int, q_group: int, sink_blocks: int) -> torch.Tensor:
    """(Mg, m) bool: the first ``sink_blocks`` key blocks and each query block's own blocks."""
    mg = ceil_div(m, q_group)
    must = torch.zeros(mg, m, dtype=torch.bool)
    must[:, :sink_blocks] = True
    for r in range(q_group):
        cols = (torch.arange(mg) * q_group + r).clamp(max=m - 1)
        must[torch.arange(mg), cols] = True
    return must


def kept_pairs(selection, kv_block: int, n: int) -> float:
    """Causal (query, key) token pairs the selection attends, summed over batch and heads."""
    q_block = selection.q_group * kv_block
    full = selection.full_num.double().sum().item() * q_block * kv_block
    # a partial block r key blocks past the query block's first one
    qpos = torch.arange(q_block, dtype=torch.float64)
    pairs_at = [
        (qpos - r * kv_block + 1).clamp(0, kv_block).sum().item() for r in range(selection.q_group)
    ]
    mg = selection.partial_num.shape[-1]
    first = (torch.arange(mg, device=selection.partial_idx.device) * selection.q_group).view(
        1, 1, mg, 1
    )
    cols = torch.arange(selection.partial_idx.shape[-1], device=first.device).view(1, 1, 1, -1)
    valid = cols < selection.partial_num.unsqueeze(-1)
    offset = (selection.partial_idx.long() - first).masked_fill(~valid, -1)
    part = sum(((offset == r).sum().item() * pairs_at[r]) for r in range(selection.q_group))
    return full + part
