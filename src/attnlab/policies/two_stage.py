"""Two-stage selection: Quest's pages as candidates, then exact scores among them
(ShadowKV arXiv:2410.21465, RetroInfer, Quest-then-exact), optionally Twilight's top-p
pruning (arXiv:2502.02770)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.blocks import block_of, n_blocks, visible_per_block
from attnlab.policies.base import ScoreContext, Selector
from attnlab.policies.fields import Range
from attnlab.policies.quest import candidate_pages
from attnlab.policies.selection import INF, prune_top_p


@dataclass
class TwoStage(Selector):
    """Each row first keeps, as Quest does, the pages of ``page`` keys whose bound
    sum_d max(q_d min_d, q_d max_d) is largest (its own page always), ``expand`` times as
    many keys as its budget; it then scores those candidates exactly and keeps the best
    under the budget. With ``top_p`` (Twilight), it keeps instead the fewest candidates
    whose share of the candidates' attention reaches ``top_p``, at most the budget, so a
    row whose attention is concentrated keeps fewer keys (the achieved sparsity records
    it). The paper versions read the candidates' keys from a compressed copy (ShadowKV's
    low-rank keys, Twilight's 4-bit ones); here they are read whole, which the read cost
    counts: the page bounds (2 / page) and the candidates' keys (expand x (1 - s)).
    """

    name = "two_stage"
    label = "Quest pages, then exact"
    prunes_itself = True  # top_p among the candidates, before the budget's cap
    page: Annotated[int, Range(1)] = 16
    """Keys per page (Quest's)."""
    expand: Annotated[float, Range(1)] = 4.0
    """Candidate keys per kept key."""
    top_p: Annotated[float, Range(0, 1)] = 0.0
    """Twilight's pruning: keep candidates until their share of the candidates' attention
    reaches top_p (0: the budget's best)."""

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """The page bounds (two vectors per page) and the candidates' keys, whole."""
        return 2 / self.page + min(1.0, self.expand * (1.0 - sparsity))

    def candidates(self, ctx: ScoreContext) -> torch.Tensor:
        """The first stage: each row's candidate keys, (B, H, Tq, Tk) bool."""
        tk = ctx.k.shape[-2]
        pages = n_blocks(tk, self.page)
        own = block_of(ctx.q_pos, self.page).unsqueeze(-1)  # (Tq, 1)
        chosen = candidate_pages(
            ctx.q,
            ctx.k,
            self.page,
            self.expand * ctx.budget.float(),
            excluded=visible_per_block(ctx.visible, self.page) == 0,
            forced=torch.arange(pages, device=own.device) == own,
        )  # (B, H, Tq, P)
        return chosen.repeat_interleave(self.page, dim=-1)[..., :tk] & ctx.visible

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        chosen = self.candidates(ctx)  # (B, H, Tq, Tk)
        if self.top_p:  # the fewest candidates holding top_p of the candidates' attention
            chosen = prune_top_p(chosen, ctx.scores, self.top_p)
        return torch.where(chosen, ctx.scores, -INF)
