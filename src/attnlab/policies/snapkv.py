"""SnapKV: keys voted for by an observation window (Li et al., 2024, arXiv:2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.policies.base import INF, Policy, ScoreContext


@dataclass
class SnapKV(Policy):
    """Each key's score is the attention it receives from the observation window, the
    last ``window`` queries of the prompt, summed over the window, averaged over the
    query heads of its key/value group (one selection per KV head, so the compressed
    cache stores no repeated keys) and max-pooled over neighbouring keys (``kernel``)
    so that a selected key keeps its context. The window's own keys are always kept.

    In the masked simulation a prefill row t is treated as the end of a prompt: its
    window is rows t - window + 1 .. t. Decode steps reuse the votes of the last prompt
    row, as SnapKV compresses the cache once after the prompt, and keep every key
    generated since.
    """

    name = "snapkv"
    window: int = 32
    """Observation window: the last queries of the prompt, whose keys are always kept."""
    kernel: int = 5
    """Width of the 1-D max pooling over key positions (odd)."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise TypeError("window must be >= 1 and kernel a positive odd number")

    def votes(self, ctx: ScoreContext) -> torch.Tensor:
        """Pooled window votes of every row: (B, H, Tq, Tk), equal within a KV group."""
        if "snapkv_votes" in ctx.__dict__:
            return ctx.__dict__["snapkv_votes"]
        probs = ctx.probs  # (B, H, Tq, Tk)
        csum = probs.cumsum(dim=-2)
        before = torch.zeros_like(csum)
        before[..., self.window :, :] = csum[..., : -self.window, :]
        vote = csum - before  # sum over the (up to) ``window`` rows ending at each row
        b, h, tq, tk = vote.shape
        g = ctx.groups
        vote = vote.view(b, h // g, g, tq, tk).mean(2)  # (B, Hkv, Tq, Tk)
        pooled = torch.nn.functional.max_pool1d(
            vote.reshape(-1, 1, tk), self.kernel, stride=1, padding=self.kernel // 2
        ).view(b, h // g, 1, tq, tk)
        votes = pooled.expand(b, h // g, g, tq, tk).reshape(b, h, tq, tk)
        ctx.__dict__["snapkv_votes"] = votes
        return votes

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        age = ctx.q_pos.unsqueeze(-1) - ctx.key_pos  # (Tq, Tk)
        prompt = ctx.history.state.get("snapkv")
        if prompt is None:  # prefill: each row is the end of a prompt
            in_window = (age >= 0) & (age < self.window)
            return torch.where(in_window, INF, self.votes(ctx))
        votes, n_prompt = prompt  # (B, H, Tp) of the last prompt row, prompt length
        score = torch.full(ctx.q.shape[:3] + ctx.k.shape[-2:-1], INF, device=ctx.q.device)
        voted = max(0, n_prompt - self.window)
        score[..., :voted] = votes[..., :voted].unsqueeze(-2)
        return score  # the prompt's window and every generated key stay

    def remember(self, ctx: ScoreContext) -> None:
        if "snapkv" not in ctx.history.state and ctx.q.shape[-2] > 1:
            last = self.votes(ctx)[..., -1, :]  # (B, H, Tk)
            ctx.history.state["snapkv"] = (last, ctx.k.shape[-2])
