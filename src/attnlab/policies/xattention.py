"""XAttention: blocks chosen by antidiagonal scoring (Xu et al., 2025, arXiv:2503.16428)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch

from attnlab.blocks import expand_kv, n_blocks
from attnlab.errors import UserError
from attnlab.policies.base import INF, BlockPolicy, ScoreContext
from attnlab.policies.fields import Range
from attnlab.policies.selection import must_keep_blocks, with_must_keep_blocks


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
    x ``block_size`` blocks: each query block gets a distribution over key blocks. As
    released, the first block and the query's own block are kept and their share counted
    first; the other key blocks follow in decreasing share while the share of the blocks
    before them stays under ``threshold`` (the rest score -inf); the budget then caps
    the kept keys, unless ``threshold_only``. Its own form (``selection: prompt``) has
    each query block choose from all its strided queries; a row (the causal form, the
    cache regime) uses the strided queries complete at it (:meth:`shares`). Shares only
    among the blocks the model's mask shows the row (a sliding-window layer's).
    """

    name = "xattention"
    label = "XAttention"
    needs_query_history = True
    paper_selection = "prompt"
    block_size: Annotated[int, Range(1)] = 128
    """Tokens per block."""
    stride: Annotated[int, Range(1)] = 8
    """Antidiagonal stride (8 or 16 in the paper); divides block_size."""
    threshold: Annotated[float, Range(0, 1)] = 0.9
    """Cumulative share of the estimated attention at which selection stops."""
    sink_block: bool = True
    """Always keep the first block (as released)."""
    threshold_only: bool = False
    """Keep every block the threshold asks for, whatever the budget (the method as
    released has no budget): the run's achieved sparsity is the threshold's."""
    head_thresholds: dict = field(default_factory=dict)
    """Calibrated thresholds, as the released RULER runs use: {"<layer>": [one per query
    head]}; a layer not listed takes ``threshold``."""

    def __post_init__(self) -> None:
        if self.block_size % self.stride or not 0 < self.threshold <= 1:
            raise TypeError("stride must divide block_size and threshold lie in (0, 1]")

    def shares(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_pos: torch.Tensor,
        scaling: float,
        kernel: bool = False,
        first_block: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Estimated attention share of each key block for each row: (B, H, Tq, Mk).

        q: (B, H, N, D) every query so far, k: (B, H or Hkv, Nk, D), both from position 0.
        A strided query (``stride`` rows) and its antidiagonal keys are used once every
        row of it exists: row t sums the strided queries of its query block that are
        complete at t, or, before the first one is, those of the previous query block. So
        a row's choice depends on tokens at or before it alone. ``kernel``: the same sums
        from the Triton kernel (:func:`attnlab.kernels.xattention.block_shares`, no
        (N / stride)^2 estimate in memory; float32 up to summation order); ``first_block``
        (Tq,): there, the first key block each row can keep (the blocks before it are
        not summed, and may be 0: a sliding window's rows).
        """
        if kernel:
            blocks = self.block_sums(q, k, q_pos, scaling, first_block)
            return blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-12)
        s, per = self.stride, self.block_size // self.stride
        lo, hi = self.strided_queries(q_pos)
        k = expand_kv(k, q.shape[1])
        est = antidiagonal_scores(q, k, s) * scaling / s  # mean over the antidiagonal
        n_q, n_k = est.shape[-2:]
        causal = (
            torch.arange(n_k, device=est.device) <= torch.arange(n_q, device=est.device)[:, None]
        )
        probs = torch.softmax(est.masked_fill(~causal, float("-inf")), dim=-1)
        upto = torch.nn.functional.pad(probs.cumsum(-2), (0, 0, 1, 0))  # sums of groups < i
        rows = upto[..., hi, :] - upto[..., lo, :]  # (B, H, Tq, n_k)
        mk = n_blocks(k.shape[-2], self.block_size)
        rows = torch.nn.functional.pad(rows, (0, mk * per - n_k))
        blocks = rows.view(*rows.shape[:-1], mk, per).sum(-1)  # (B, H, Tq, Mk)
        return blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-12)

    def strided_queries(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The strided queries lo .. hi - 1 each row at ``q_pos`` (Tq,) sums (:meth:`shares`)."""
        s, per = self.stride, self.block_size // self.stride
        done = torch.div(q_pos + 1, s, rounding_mode="floor")  # complete strided queries
        first = torch.div(q_pos, self.block_size, rounding_mode="floor") * per
        early = done <= first  # no complete strided query in the row's block yet
        hi = torch.where(early, first, done)
        return torch.where(early, first - per, first).clamp(min=0), hi

    def block_sums(self, q, k, q_pos, scaling, first_block=None) -> torch.Tensor:
        """The Triton kernel's sums of :meth:`shares` before their normalisation (B, H,
        Tq, Mk) (:func:`attnlab.kernels.xattention.block_shares`)."""
        from attnlab.kernels.xattention import block_shares

        lo, hi = self.strided_queries(q_pos)
        return block_shares(q, k, lo, hi, self.stride, self.block_size, scaling, first=first_block)

    def triton_shares(self, ctx: ScoreContext) -> bool:
        """Whether the Triton kernel forms the shares: the fused path, rows of a whole
        prefill (every query from position 0 at hand), a power of two strided queries
        per block."""
        per = self.block_size // self.stride
        return (
            ctx.triton
            and ctx.history.q is None
            and ctx.q_all.shape[-2] == ctx.k.shape[-2]
            and per & (per - 1) == 0
        )

    def thresholds(self, layer: int, share: torch.Tensor) -> torch.Tensor | float:
        """The layer's threshold: one per query head, (H, 1, 1), where calibrated."""
        per_head = self.head_thresholds.get(str(layer))
        if per_head is None:
            return self.threshold
        if len(per_head) != share.shape[1] or not all(0 < t <= 1 for t in per_head):
            raise UserError(
                f"xattention: head_thresholds[{layer!r}] needs {share.shape[1]} values in"
                f" (0, 1], got {per_head}"
            )
        return torch.tensor(per_head, device=share.device, dtype=share.dtype)[:, None, None]

    def keeps_what_fits(self) -> bool:
        """No: a block past the threshold's share scores -inf, whatever the budget."""
        return False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        q = ctx.q_all[..., : ctx.k.shape[-2], :]
        kernel = self.triton_shares(ctx)
        k = ctx.k[:, :: ctx.groups] if kernel else ctx.k  # the key/value heads themselves
        # only the blocks the model's own mask lets the row see share its attention (a
        # sliding window hides the rest; the estimate itself runs over every causal key),
        # so the kernel sums none before a row's first visible block
        counts = ctx.blocks_seen(self.block_size)  # (B, 1 or H, Tq, Mk), once per mask

        def visible():  # the blocks seen and each row's first (Tq,); counts keeps its id
            seen = counts > 0
            return counts, seen, seen.flatten(0, 1).any(0).int().argmax(-1)

        seen, first_block = ctx.cached(("xattention seen", id(counts)), visible)[1:]
        first_block = first_block if kernel else None
        must = must_keep_blocks(ctx.q_pos, seen.shape[-1], self, ctx)  # (Tq, Mk)
        if kernel:  # the tail below in one kernel, where a row fits it
            from attnlab.kernels.xattention import THRESHOLD_BLOCKS, threshold_scores

            if seen.shape[-1] <= THRESHOLD_BLOCKS:
                blocks = self.block_sums(q, k, ctx.q_pos, ctx.scaling, first_block)
                thresholds = self.thresholds(ctx.layer, blocks)
                return threshold_scores(blocks, seen, must, thresholds, self.threshold_only)
        share = self.shares(q, k, ctx.q_pos, ctx.scaling, kernel, first_block)  # (B, H, Tq, Mk)
        score = self.threshold_scores(share, seen, must, ctx.layer)
        return with_must_keep_blocks(score, ctx.q_pos, self, ctx, in_place=ctx.triton)

    def threshold_scores(self, share, seen, must, layer: int) -> torch.Tensor:
        """The scores of :meth:`score` from the rows' ``share`` (B, H, Tq, Mk), before the
        must-keep blocks' +inf: the shares among the ``seen`` blocks (B or 1, H or 1, Tq,
        Mk bool), the ``must`` (Tq, Mk) blocks counted first, the others in decreasing
        share while the share before them stays under the layer's threshold."""
        share = share * seen
        share = share / share.sum(-1, keepdim=True).clamp(min=1e-12)
        first = (share * must).sum(-1, keepdim=True)  # counted before any other block
        order = share.masked_fill(must, -1.0).sort(dim=-1, descending=True)
        ranked = order.values.clamp(min=0)
        before = first + ranked.cumsum(-1) - ranked  # share of the blocks ranked above
        needed = torch.zeros_like(share, dtype=torch.bool).scatter_(
            -1, order.indices, before < self.thresholds(layer, share)
        )
        return torch.where(needed, INF if self.threshold_only else share, -INF)
