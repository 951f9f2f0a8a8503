"""StreamingLLM: attention sinks plus a recent window (Xiao et al., 2024, arXiv:2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from attnlab.policies.base import INF, Policy, ScoreContext
from attnlab.policies.fields import Range


@dataclass
class StreamingLLM(Policy):
    """Keeps the first ``n_sink`` tokens (attention sinks) and the most recent keys that
    fit the rest of the budget; everything in between is evicted for good, as the paper's
    rolling cache does (a key that leaves the window never comes back).
    """

    name = "streamingllm"
    label = "StreamingLLM"
    evicts = True
    static_eviction = True
    n_sink: Annotated[int, Range(0)] = 4
    """Leading tokens always kept."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        pos = ctx.key_pos.float()  # (Tk,) later keys score higher: a recency window
        score = torch.where(ctx.key_pos < self.n_sink, INF, pos)
        return score.expand(*ctx.q.shape[:3], -1)  # (B, H, Tq, Tk)
