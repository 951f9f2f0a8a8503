"""Random key blocks: the ablation that keeps block structure but drops any signal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.blocks import block_of, n_blocks
from attnlab.policies.base import BlockPolicy, ScoreContext
from attnlab.policies.selection import with_must_keep_blocks


@dataclass
class RandomBlock(BlockPolicy):
    """Keeps random key blocks under the budget, with the same must-keep blocks as CAB
    (the query's own block and the first block), drawn from a seed fixed per layer so
    that prefill and decode see one draw.
    """

    name = "random_block"
    label = "random blocks"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, h = ctx.q.shape[:2]
        # every row's own block is among the keys' (the cache holds every key): no
        # wait for the device to read the last row's block
        m = n_blocks(ctx.k.shape[-2], self.block_size)
        table = _draw(ctx.seed * 100_003 + ctx.layer, (b, h, m, m), ctx.q.device)
        score = table[:, :, block_of(ctx.q_pos, self.block_size)]
        return with_must_keep_blocks(score, ctx.q_pos, self, ctx, in_place=ctx.triton)


_TABLES: dict[tuple, tuple[tuple[int, ...], torch.Tensor]] = {}  # the latest per layer


def _draw(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, H, Mq, Mk) uniform scores from a CPU generator seeded per layer (the same draw
    on any device, for any call of the layer), drawn once and kept on ``device``: the
    latest shape per (seed, device), so a model keeps one table a layer (64 MiB at 32k
    tokens in blocks of 16, 4 heads)."""
    kept = _TABLES.get((seed, device))
    if kept is None or kept[0] != shape:
        gen = torch.Generator().manual_seed(seed)
        kept = _TABLES[seed, device] = (shape, torch.rand(*shape, generator=gen).to(device))
    return kept[1]
