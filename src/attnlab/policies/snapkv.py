"""SnapKV: keys voted for by an observation window (Li et al., 2024, arXiv:2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from attnlab.policies.base import Policy, ScoreContext
from attnlab.policies.fields import Range
from attnlab.policies.selection import INF, select_tokens


@dataclass
class SnapKV(Policy):
    """The observation window, the prompt's last ``window`` queries (they hold the
    question), votes for the keys before it: each key's score is its attention from the
    window averaged over the window, pooled over neighbouring keys (``kernel``, so that a
    selected key keeps its context) and averaged over the query heads of its key/value
    group (one selection per KV head, so the compressed cache stores no repeated keys).
    The window's own keys are always kept. The cache is compressed once, at the end of
    the prompt, and every generated key stays: the paper's method and the order of
    operations of its official code and of kvpress's ``SnapKVPress`` (pooling first,
    then the group mean; the pooling runs over the voted keys alone, zero-padded).

    In the ``prefill`` regime each row is treated as the end of a prompt (its window is
    the ``window`` rows ending at it, across the calls of a chunked prefill), with
    eviction memory.
    """

    name = "snapkv"
    label = "SnapKV"
    evicts = True
    window: Annotated[int, Range(1)] = 32
    """Observation window: the last queries of the prompt, whose keys are always kept."""
    kernel: Literal[1, 3, 5, 7, 9] = 5
    """Width of the 1-D pooling over key positions (odd)."""
    pooling: Literal["avgpool", "maxpool"] = "avgpool"
    """"avgpool" (the official code's and kvpress's default) or "maxpool"."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise TypeError("window must be >= 1 and kernel a positive odd number")
        if self.pooling not in ("avgpool", "maxpool"):
            raise TypeError(f"pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def _pool(self, vote: torch.Tensor, groups: int) -> torch.Tensor:
        """Pool over keys, then average over each KV group's query heads.

        vote: (B, H, R, N) window means of the N voted keys -> (B, H, R, N), equal within
        a KV group."""
        b, h, r, n = vote.shape
        pool = (
            torch.nn.functional.avg_pool1d
            if self.pooling == "avgpool"
            else torch.nn.functional.max_pool1d
        )
        flat = vote.reshape(-1, 1, n)
        if self.pooling == "maxpool":
            flat = torch.nn.functional.pad(flat, (self.kernel // 2,) * 2, value=float("-inf"))
            pooled = pool(flat, self.kernel, stride=1)
        else:
            pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2)
        pooled = pooled.view(b, h // groups, groups, r, n).mean(2, keepdim=True)
        return pooled.expand(b, h // groups, groups, r, n).reshape(b, h, r, n)

    def _window_rows(self, ctx: ScoreContext) -> torch.Tensor:
        """Full-attention weights of the call's rows after those of the (up to) window - 1
        rows before them (a chunked prefill's earlier call, kept by :meth:`remember`):
        (B, H, P + Tq, Tk), P the earlier rows."""
        prev = ctx.history.window_probs
        if prev is None:
            return ctx.probs
        prev = torch.nn.functional.pad(prev, (0, ctx.k.shape[-2] - prev.shape[-1]))
        return torch.cat([prev, ctx.probs], dim=-2)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.history.compressed:  # compressed once: every cached key stays
            return torch.full(ctx.q.shape[:3] + ctx.k.shape[-2:-1], INF, device=ctx.q.device)
        # prefill regime: row t votes with rows t - window + 1 .. t for the keys before them
        w, tq = self.window, ctx.q.shape[-2]
        csum = self._window_rows(ctx).cumsum(dim=-2)  # (B, H, P + Tq, Tk)
        before = torch.zeros_like(csum)
        before[..., w:, :] = csum[..., :-w, :]
        vote = ((csum - before) / w)[..., -tq:, :]
        score = self._pool(vote, ctx.groups)
        age = ctx.q_pos.unsqueeze(-1) - ctx.key_pos  # (Tq, Tk)
        return torch.where((age >= 0) & (age < w), INF, score)

    def remember(self, ctx: ScoreContext) -> None:
        """In the prefill regime, keep the last window - 1 rows' weights for the rows of
        the next call (a chunked prefill); nothing once the cache is compressed."""
        super().remember(ctx)
        w = self.window
        if w > 1 and ctx.computed("probs") and not ctx.history.compressed:
            rows = ctx.probs if ctx.q.shape[-2] >= w - 1 else self._window_rows(ctx)
            ctx.history.window_probs = rows[..., 1 - w :, :]

    def compress(self, ctx: ScoreContext) -> torch.Tensor:
        ctx.history.compressed = True
        t = ctx.k.shape[-2]
        w = min(self.window, t)
        probs = ctx.window_probs(w)  # (B, H, w, T) the window's attention
        vote = probs[..., : t - w].mean(-2, keepdim=True)  # (B, H, 1, T - w)
        score = torch.nn.functional.pad(self._pool(vote, ctx.groups), (0, w), value=INF)
        last = ctx.last_row()
        return select_tokens(score, last.visible, last.budget)[..., 0, :]
