"""Loki: scores estimated in a low-rank principal-component space of the keys (Singhania
et al., 2024, arXiv:2406.02542)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.policies.base import ScoreContext, Selector
from attnlab.policies.fields import Range


def principal_axes(k: torch.Tensor) -> torch.Tensor:
    """Orthonormal axes of the keys k (B, H, T, D), by decreasing energy sum_t (k_t . u)^2:
    (B, H, D, D), column i the i-th axis."""
    k = k.float()
    energy, axes = torch.linalg.eigh(k.transpose(-1, -2) @ k)  # ascending
    return axes.flip(-1)


@dataclass
class Loki(Selector):
    """Each row rotates its query and the keys onto the keys' principal axes and estimates
    every key's score from the first r = ``channels`` x head_dim of them, then keeps the
    keys of largest estimate under the budget; attention over them is exact. The paper
    fits the axes offline on calibration text, per layer and head; here they are fitted on
    the keys a layer has cached when it is first called (the prompt, in the cache regime,
    its home; the first chunk of a chunked prefill), uncentred, and kept fixed after, so a
    row never reads axes fitted on keys after it. A call with no axes yet (a prefill's
    rows, or its first chunk's) reads the first r channels as they are.
    """

    name = "loki"
    label = "Loki"
    channels: Annotated[float, Range(0, 1)] = 0.25
    """Share of the principal axes the estimate reads (r / head_dim; the paper's 1/4)."""

    def rank(self, head_dim: int) -> int:
        """r: the axes the estimate reads."""
        return max(1, min(head_dim, round(self.channels * head_dim)))

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """Share of the keys' bytes a row reads to choose: r of each key's head_dim
        coordinates (the keys kept rotated, as Loki stores them)."""
        return self.rank(head_dim) / head_dim

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        r = self.rank(ctx.q.shape[-1])
        axes = ctx.history.axes
        if axes is None:
            q_r, k_r = ctx.q[..., :r].float(), ctx.k[..., :r].float()
        else:
            q_r, k_r = ctx.q.float() @ axes[..., :r], ctx.k.float() @ axes[..., :r]
        est = torch.einsum("bhqr,bhkr->bhqk", q_r, k_r)  # (B, H, Tq, Tk)
        return torch.where(ctx.visible, est, -torch.inf)

    def remember(self, ctx: ScoreContext) -> None:
        """Fit the axes on the keys cached after the layer's first call; keep them."""
        super().remember(ctx)
        if ctx.history.axes is None:
            ctx.history.axes = principal_axes(ctx.k)
