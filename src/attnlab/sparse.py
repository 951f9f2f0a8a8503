"""Run any Hugging Face causal LM with a sparse-attention policy in every layer.

The attention function registered as ``attnlab`` in transformers' ``AttentionInterface``
reads the active :class:`SparseRun` (a context manager). With no run active, or with the
``full`` policy, it is plain eager attention. Otherwise, for each layer and each call
(prefill, then every decode step), it builds the policy's keep-mask under the per-row
budget, applies it on top of the model's own mask (causality, sliding windows), and
counts kept and visible (query, key) pairs so the achieved sparsity is measured, not
assumed. Grouped-query attention is handled by expanding key/value heads.

On CUDA, the causal prefill of a block-level policy (CAB and its ablations) runs through
FlexAttention's block-sparse kernel instead of a masked softmax: the selection is then
made per query block (each block takes its last row's choice and budget), the
granularity a BlockMask can express. Decode steps, token-level policies and layers with
sliding windows take the masked path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnlab.kernels.reference import expand_kv
from attnlab.policies.base import (
    LayerHistory,
    Policy,
    ScoreContext,
    block_counts,
    block_keep,
    keep_mask,
    row_budget,
)

IMPLEMENTATION = "attnlab"
_ACTIVE: contextvars.ContextVar[SparseRun | None] = contextvars.ContextVar(
    "sparse_run", default=None
)
# Called as observer(layer, query, probs) with the weights each eager call used.
_OBSERVER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "attention_observer", default=None
)


class observe:
    """Context manager: pass every layer's attention weights to ``fn(layer, query, probs)``
    (query (B, H, Tq, D) after RoPE; probs (B, H, Tq, Tk) float32), one layer at a time,
    so nothing is kept unless ``fn`` keeps it. Observed calls take the eager path."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __enter__(self) -> observe:
        self._token = _OBSERVER.set(self.fn)
        return self

    def __exit__(self, *exc) -> None:
        _OBSERVER.reset(self._token)


@dataclass
class SparseRun:
    """A policy at a target sparsity, applied while the run is active (``with run:``).

    ``watch`` holds key positions (the needle's value tokens) whose retention by the last
    prompt query is recorded per layer at prefill, as the ``needle_kept`` diagnostic.
    """

    policy: Policy
    sparsity: float = 0.0
    seed: int = 0
    watch: Sequence[int] = ()
    kept: int = 0
    visible: int = 0
    backend: str = "auto"  # "auto": FlexAttention on CUDA; "eager"; or "flex" anywhere
    watch_kept: list[float] = field(default_factory=list)
    histories: dict[int, LayerHistory] = field(default_factory=dict)
    _token: contextvars.Token | None = None

    def __enter__(self) -> SparseRun:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of visible (query, key) pairs masked, over every layer, head and call."""
        return 1.0 - self.kept / self.visible if self.visible else 0.0

    @property
    def needle_kept(self) -> float:
        """Share of (layer, head) pairs whose last prompt query keeps a watched key, among
        the layers whose own mask lets that query see it."""
        return sum(self.watch_kept) / len(self.watch_kept) if self.watch_kept else float("nan")

    def _context(self, layer, q, k, visible, scaling, kv_heads=None) -> ScoreContext:
        tq, tk = q.shape[-2], k.shape[-2]
        return ScoreContext(
            q=q,
            k=k,
            visible=visible,
            q_pos=torch.arange(tk - tq, tk, device=q.device),  # the cache holds every key
            budget=row_budget(visible.sum(-1), self.sparsity),  # (B, 1, Tq)
            scaling=scaling,
            layer=layer,
            seed=self.seed,
            history=self.histories.setdefault(layer, LayerHistory()),
            kv_heads=kv_heads,
        )

    def _remember(self, ctx: ScoreContext) -> None:
        if self.policy.needs_query_history:
            ctx.history.q = ctx.q_all
        if self.policy.needs_received:
            ctx.history.received = ctx.received[..., -1, :]  # (B, H, Tk) totals so far
        self.policy.remember(ctx)

    def mask(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        visible: torch.Tensor,
        scaling: float,
        scores: torch.Tensor,
        kv_heads: int | None = None,
    ) -> torch.Tensor:
        """Keep-mask for one layer call; q: (B, H, Tq, D), k: (B, H, Tk, D) -> (B, H, Tq, Tk)."""
        ctx = self._context(layer, q, k, visible, scaling, kv_heads)
        ctx.__dict__["scores"] = scores  # already computed for the attention itself
        keep = keep_mask(self.policy, ctx)  # (B, H, Tq, Tk)
        self._remember(ctx)
        self.account(keep, visible)
        return keep

    def uses_flex(self, query: torch.Tensor, tq: int, tk: int) -> bool:
        """Whether a call runs through FlexAttention: a block policy's causal prefill, on
        CUDA (``backend="auto"``) or wherever ``backend="flex"`` asks for it."""
        wanted = self.backend == "flex" or (self.backend == "auto" and query.is_cuda)
        return wanted and self.policy.level == "block" and tq == tk

    def block_mask(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, scaling: float, kv_heads=None
    ):
        """Block selection of a causal prefill at query-block granularity, for FlexAttention.

        Each query block uses the selection and budget of its last row. q: (B, H, T, D),
        k: (B, H, T, D). Returns ``(keep, visible)``: (B, H, Mq, Mk) bool blocks and the
        (1, 1, T, T) causal mask.
        """
        t, bs = q.shape[-2], self.policy.block_size
        visible = visible_mask(None, t, t, q.device)
        ctx = self._context(layer, q, k, visible, scaling, kv_heads)
        score = self.policy.score(ctx)  # (B, H, T, Mk)
        ends = torch.arange(bs - 1, t + bs - 1, bs, device=q.device).clamp(max=t - 1)
        keep = block_keep(
            score[..., ends, :], block_counts(visible[..., ends, :], bs), ctx.budget[..., ends]
        )  # (B, H, Mq, Mk)
        self._remember(ctx)
        return keep, visible

    def flex_attention(self, layer, query, key, value, scaling) -> torch.Tensor:
        """Prefill under a block policy through FlexAttention's block-sparse kernel.

        query: (B, H, T, D); key, value: (B, Hkv, T, D). Returns (B, H, T, D).
        """
        from attnlab.flex import flex_block_sparse_attention

        t, bs = query.shape[-2], self.policy.block_size
        keep, visible = self.block_mask(
            layer, query, expand_kv(key, query.shape[1]), scaling, key.shape[1]
        )
        tokens = keep.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :t, :t]
        self.account(tokens & visible, visible)
        return flex_block_sparse_attention(query, key, value, keep, bs, scaling)

    def account(self, keep: torch.Tensor, visible: torch.Tensor) -> None:
        """Count kept and visible pairs; at prefill, note whether the last row keeps the needle.

        keep: (B, H, Tq, Tk) bool (may be a broadcast view); visible: (B, 1, Tq, Tk).
        """
        self.kept += int(keep.sum())
        self.visible += int(visible.sum()) * keep.shape[1]
        watch = list(self.watch)
        # At prefill the last prompt row answers; layers whose own window hides the needle
        # (sliding-window layers) have nothing a policy could keep and are not counted.
        if watch and keep.shape[-2] > 1 and visible[:, :, -1, watch].any():
            hit = keep[:, :, -1, watch].any(-1).float()  # (B, H)
            self.watch_kept.extend(hit.flatten().tolist())


def visible_mask(attention_mask: torch.Tensor | None, tq: int, tk: int, device) -> torch.Tensor:
    """The model's own mask as bool (B or 1, 1, Tq, Tk), True where a key may be seen."""
    if attention_mask is None:
        q_pos = torch.arange(tk - tq, tk, device=device).unsqueeze(-1)
        return (torch.arange(tk, device=device) <= q_pos)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :tk]
    return attention_mask[..., :tk] > torch.finfo(attention_mask.dtype).min / 2


def _causal(attention_mask: torch.Tensor | None, t: int) -> bool:
    """Whether the model's own mask is plain causal (no window, no padding) over t tokens."""
    return attention_mask is None or int(visible_mask(attention_mask, t, t, "cpu").sum()) == (
        attention_mask.shape[0] * t * (t + 1) // 2
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Eager attention under the active policy; shapes as transformers passes them.

    query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D). Returns (B, Tq, H, D).
    """
    run = _ACTIVE.get()
    h, tq, tk = query.shape[1], query.shape[2], key.shape[2]
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    if (
        run is not None
        and softcap is None
        and run.uses_flex(query, tq, tk)
        and _OBSERVER.get() is None
        and _causal(attention_mask, tq)
    ):
        out = run.flex_attention(module.layer_idx, query, key, value, scaling)
        return out.transpose(1, 2).contiguous(), None
    k = expand_kv(key, h)  # (B, H, Tk, D)
    v = expand_kv(value, h)
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visible_mask(attention_mask, tq, tk, query.device)  # (B, 1, Tq, Tk)
    scores = torch.where(visible, scores, float("-inf"))
    if run is not None and run.policy.name != "full":
        keep = run.mask(module.layer_idx, query, k, visible, scaling, scores, key.shape[1])
        scores = torch.where(keep, scores, float("-inf"))
    elif run is not None:
        run.account(visible.expand(-1, h, -1, -1), visible)
    probs = torch.softmax(scores, dim=-1)
    observer = _OBSERVER.get()
    if observer is not None:
        observer(module.layer_idx, query, probs)
    out = torch.matmul(probs.to(value.dtype), v)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Register the ``attnlab`` attention (and its mask builder) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    model.set_attn_implementation(IMPLEMENTATION)
    return model


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    run: SparseRun,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] = lambda ids: False,
) -> list[int]:
    """Greedy decoding of at most ``max_new_tokens`` under ``run``; input_ids (1, T).

    Prefill and every decode step run under the policy. ``stop(new_ids)`` ends early.
    The cache is created without the model's config so it keeps every key (sliding-window
    layers are windowed by the mask, not by dropping keys), which keeps key positions
    absolute for the policies.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    new: list[int] = []
    ids = input_ids
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    with run:
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = int(out.logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
            if stop(new):
                break
            ids = torch.tensor([[nxt]], device=input_ids.device)
    return new
