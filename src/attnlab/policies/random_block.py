"""Random key blocks: the ablation that keeps block structure but drops any signal."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.blocks import block_of, n_blocks
from attnlab.policies.base import BlockPolicy, ScoreContext, with_must_keep_blocks


@dataclass
class RandomBlock(BlockPolicy):
    """Keeps random key blocks under the budget, with the same must-keep blocks as CAB
    (the query's own block and the first block), drawn from a seed fixed per layer so
    that prefill and decode see one draw.
    """

    name = "random_block"
    label = "random blocks"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, h, tq, _ = ctx.q.shape
        mk = n_blocks(ctx.k.shape[-2], self.block_size)
        m = max(mk, int(block_of(ctx.q_pos[-1:], self.block_size)) + 1)
        gen = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.layer)
        table = torch.rand(b, h, m, m, generator=gen)  # (B, H, Mq, Mk), same for any call
        score = table[:, :, block_of(ctx.q_pos, self.block_size).cpu(), :mk]
        return with_must_keep_blocks(score.to(ctx.q.device), ctx.q_pos, self)
