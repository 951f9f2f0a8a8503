"""CAB: curvature-aware block selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from attnlab.blocks import block_of
from attnlab.kernels.reference import cab_block_scores, cab_row_scores, causal_zscore
from attnlab.policies.base import BlockPolicy, ScoreContext
from attnlab.policies.fields import Range
from attnlab.policies.quest import candidate_pages, page_bounds, upper_bound
from attnlab.policies.selection import INF, with_must_keep_blocks
from attnlab.policies.sparq import SparQ


@dataclass
class CAB(BlockPolicy):
    """Curvature-Aware Block selection (this project's method). Q and K are coarsened to
    one max-L2 token per block; the coarse attention graph's Forman-Ricci curvature F
    ranks key blocks per query block by lam * z(-F) + (1 - lam) * z(A), so bridge-like
    (most negatively curved) edges are kept first, within the budget. Each row is scored
    from tokens at or before it alone (:func:`~attnlab.kernels.reference.cab_row_scores`:
    degrees are prefix sums over query blocks, its own block's representatives are
    those of the block so far), so a later token never reaches an earlier row. Its own
    form for a prompt given whole (``selection: prompt``, the research plan's) scores
    each query block from the whole prompt's coarse graph, degrees over every query block
    (:func:`~attnlab.kernels.reference.cab_block_scores`). The Triton kernels compute both
    forms (:mod:`attnlab.kernels.cab`); the fused GPU prefill scores with them.
    """

    name = "cab"
    label = "CAB"
    needs_query_history = True
    paper_selection = "prompt"
    lam: Annotated[float, Range(0, 1)] = 1.0
    """Weight of curvature against coarse magnitude (1 = pure curvature)."""
    adjacency: Literal["softmax", "scores", "dot"] = "softmax"
    """Coarse graph weights: "softmax" (row-normalised), "scores" (shifted scaled scores)
    or "dot" (Q_c K_c^T unscaled, the research plan's formula)."""
    graph: Literal["symmetric", "directed", "rowsum"] = "symmetric"
    """"symmetric" ((A + A^T) / 2, diagonal dropped: the default, the graph in which a
    barbell's bridge is the most negative edge, docs/curvature.md), "directed" (out-degree
    of the query block, in-degree of the key block) or "rowsum" (row sums at both ends,
    the research plan's formula)."""
    query: Literal["block", "row"] = "block"
    """Who stands for the row's own block in its coarse row: "block" (the block's max-L2
    query so far) or "row" (the row's own query: query-aware)."""
    candidates: Annotated[float, Range(0)] = 0.0
    """Curvature as a re-ranker: only the key blocks among a Quest stage's best (bound
    sum_d max(q_d min_d, q_d max_d) per block) for this many times the row's budget in
    keys can be kept (0: every block)."""
    magnitude: Literal["coarse", "quest", "sparq"] = "coarse"
    """What the (1 - lam) term ranks key blocks by: "coarse" (the coarse graph's weight A,
    CAB's own), "quest" (Quest's page bound for the row's query) or "sparq" (SparQ's
    estimate from the query's 1/8 largest channels, its largest key per block)."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.q_all[..., : ctx.k.shape[-2], :]  # (B, H, Tk, D): queries of the key prefix
        other = self.blends_other
        score = cab_row_scores(
            q,
            ctx.k,
            ctx.q_pos,
            self.block_size,
            ctx.scaling,
            1.0 if other else self.lam,  # another predictor's term is blended below
            self.adjacency,
            self.graph,
            self.query,
        )  # (B, H, Tq, M)
        if other:
            score = self.blend(score, ctx)
        must = with_must_keep_blocks(score, ctx.q_pos, self, ctx, in_place=ctx.triton)
        return self.among_candidates(must, ctx)

    @property
    def blends_other(self) -> bool:
        """Whether the (1 - lam) term is another predictor's (``magnitude``) and counts."""
        return self.magnitude != "coarse" and self.lam < 1.0

    def blend(self, curvature: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """lam * z(-F) + (1 - lam) * z(P), P the ``magnitude`` predictor's block scores,
        each z-scored over the row's blocks at or before its own, as CAB blends with A
        (Quest's bound of the row's own page, which reads that page's later keys, is left
        out: z 0). ``curvature``: (B, H, Tq, M) z(-F), -inf beyond the row's block."""
        m = curvature.shape[-1]
        causal = curvature > -INF  # (B, H, Tq, M): the row's blocks, the same in every head
        stats = causal  # the blocks whose P the z-score reads
        if self.magnitude == "quest":
            pred = upper_bound(ctx.q, *page_bounds(ctx.k, self.block_size))
            # the own page's bound reads the page's keys after the row: left out (z 0)
            own = (
                torch.arange(m, device=causal.device)
                == block_of(ctx.q_pos, self.block_size)[:, None]
            )
            stats = causal & ~own
        else:  # sparq: its estimate of every key the row sees, the block's largest
            est = SparQ().score(ctx)  # (B, H, Tq, Tk), -inf where the row does not see
            est = torch.nn.functional.pad(
                est, (0, m * self.block_size - est.shape[-1]), value=-torch.inf
            )
            pred = est.unflatten(-1, (m, self.block_size)).amax(-1)
            # a block the row cannot see (beyond it, or hidden by a window): the row's least
            low = pred.masked_fill(~torch.isfinite(pred), torch.inf).amin(-1, keepdim=True)
            pred = torch.where(torch.isfinite(pred), pred, low.nan_to_num(posinf=0.0))
        z = causal_zscore(pred.float(), stats)
        score = self.lam * curvature.masked_fill(~causal, 0.0) + (1.0 - self.lam) * z
        return score.masked_fill(~causal, -INF)

    def block_scores(self, ctx: ScoreContext, rows: torch.Tensor, form: str) -> torch.Tensor:
        """The prompt form with the block's representative as its query (``query:
        block``): every query block's row of the whole prompt's curvature scores; else the
        chosen row's scores (the query-aware variant and the blends with another
        predictor: the block's last query). On the fused path (``ctx.triton``) both forms
        come from the Triton kernels (:func:`attnlab.kernels.cab.cab_scores`, the same
        scores up to float32 summation order) where they compute this variant."""
        if self.triton_scores(ctx, rows):
            from attnlab.kernels.cab import cab_scores

            # pure curvature skips the products left of a window's bands (per-row
            # z-scores keep the bands' order), a blend with A reads whole rows
            first = ctx.first_blocks if self.lam == 1.0 else None
            # coarse magnitude: a query block's scores are its own row of A, so the rows
            # that keep what they see (a window's whole rows) are not scored
            chosen = ctx.chosen_blocks if self.lam == 0.0 else None
            # the keys expanded to the query heads, as the reference coarsens them: the
            # same representatives bit for bit (cab_scores)
            score = cab_scores(
                ctx.q, ctx.k, self.block_size, ctx.scaling, form, query=self.query,
                lam=self.lam, adjacency=self.adjacency, graph=self.graph, first=first,
                rows=chosen,
            )  # fmt: skip
        elif form != "prompt" or self.query != "block" or self.blends_other:
            return super().block_scores(ctx, rows, form)
        else:
            q = ctx.q_all[..., : ctx.k.shape[-2], :]
            score = cab_block_scores(
                q, ctx.k, self.block_size, ctx.scaling, self.lam, self.adjacency, self.graph
            )  # (B, H, M, M)
        sub = ctx.rows(rows)
        must = with_must_keep_blocks(score, sub.q_pos, self, sub, in_place=ctx.triton)
        return self.among_candidates(must, sub)

    def triton_scores(self, ctx: ScoreContext, rows: torch.Tensor) -> bool:
        """Whether the Triton kernels score this prefill: the fused path, a whole prefill
        (no earlier rows; one row per query block), no other predictor blended (either
        query: the query-aware prompt form is the causal form's kernels on each block's
        last row), any adjacency and graph, blocks of a power of two."""
        t = ctx.q.shape[-2]
        return (
            ctx.triton
            and ctx.history.q is None
            and ctx.k.shape[-2] == t
            and rows.numel() == -(-t // self.block_size)
            and not self.blends_other
            and self.block_size & (self.block_size - 1) == 0
        )

    def keeps_what_fits(self) -> bool:
        """Not with a Quest stage: a block outside its candidates scores -inf."""
        return not self.candidates

    def among_candidates(self, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        """``score`` (B, H, Tq, M) of the rows of ``ctx`` with every block outside the
        Quest stage's candidates at -inf (must-keep blocks stay); as is without
        ``candidates``."""
        if not self.candidates:
            return score
        keys = self.candidates * ctx.budget.float()
        # only blocks the row sees: the scores also cover later blocks (the prompt form's
        # whole graph) and blocks a sliding window hides, whose keys it cannot keep
        unseen = ctx.blocks_seen(self.block_size) == 0
        chosen = candidate_pages(
            ctx.q, ctx.k, self.block_size, keys, excluded=(score == -INF) | unseen
        )
        return score.masked_fill(~chosen & (score < INF), -INF)
