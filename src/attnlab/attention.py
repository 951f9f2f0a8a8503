"""The ``attnlab`` attention: any Hugging Face causal LM under the active sparse run.

:func:`install` registers this attention in transformers' ``AttentionInterface`` and
switches a model to it. With no :class:`~attnlab.sparse.SparseRun` active it is plain
attention through fused kernels and no (T, T) mask tensor (:mod:`attnlab.masks`): a
causal layer through PyTorch's SDPA with ``is_causal``, a sliding-window layer's prefill
on CUDA through FlexAttention with the model's own mask as a ``BlockMask``; with one,
each call where the run's policy acts takes the run's keep-mask. Grouped-query attention
is passed to the kernels (``enable_gqa``), or handled by expanding key/value heads where
scores are materialised.

The prefill of a block-level policy (CAB and its ablations, Quest, XAttention) chooses
once per query block (:meth:`~attnlab.sparse.SparseRun.block_selection`, in the policy's
selection form), the granularity a BlockMask expresses; on CUDA it runs through
FlexAttention's block-sparse kernel, elsewhere as the same selection's keep-mask; in a
sliding-window layer the model's window is applied pair by pair over the kept blocks.
Decode steps and token-level policies take the masked path; a token-level policy's long
call runs in row chunks (``row_chunk``, :func:`chunked_attention`). :class:`observe`
hands every layer's weights to a function (the capture stage), through the eager path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

from attnlab.blocks import expand_kv
from attnlab.masks import ModelMask, model_mask, visible_mask
from attnlab.phases import phase
from attnlab.policies.base import LayerHistory
from attnlab.sparse import active

IMPLEMENTATION = "attnlab"
# Called as observer(layer, query, probs) with the weights each eager call used.
_OBSERVER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "attention_observer", default=None
)
# The kernel of a sliding-window layer's prefill with no policy mask: "auto" (FlexAttention
# on CUDA, SDPA under the dense mask elsewhere), "flex" or "sdpa" (see window_kernel).
_WINDOW_KERNEL: contextvars.ContextVar[str] = contextvars.ContextVar(
    "window_kernel", default="auto"
)


@contextlib.contextmanager
def window_kernel(kernel: str):
    """Run sliding-window prefills through ``"flex"`` (FlexAttention, eager on the CPU),
    ``"sdpa"`` (SDPA under the dense mask) or ``"auto"`` while the block runs."""
    if kernel not in ("auto", "flex", "sdpa"):
        raise ValueError(f"window kernel must be auto, flex or sdpa, got {kernel!r}")
    token = _WINDOW_KERNEL.set(kernel)
    try:
        yield
    finally:
        _WINDOW_KERNEL.reset(token)


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


def _causal(attention_mask, t: int, module: torch.nn.Module) -> bool:
    """Whether the model's own mask (None, a :class:`~attnlab.masks.ModelMask` or a
    tensor) is plain causal (no window, no padding) over t tokens."""
    if attention_mask is None:
        return True
    if isinstance(attention_mask, ModelMask):
        return attention_mask.plain_causal(module)
    visible = visible_mask(attention_mask, t, t, "cpu")
    return int(torch.count_nonzero(visible)) == (attention_mask.shape[0] * t * (t + 1) // 2)


def _unpadded(attention_mask) -> bool:
    """Whether the model's mask is a :class:`~attnlab.masks.ModelMask` without padding
    (its pattern alone: a sliding window), which FlexAttention applies pair by pair."""
    return isinstance(attention_mask, ModelMask) and attention_mask.unpadded()


def _window_flex(attention_mask, query: torch.Tensor, tq: int, tk: int) -> bool:
    """Whether a prefill under the model's own (non-causal) mask runs through FlexAttention."""
    kernel = _WINDOW_KERNEL.get()
    wanted = kernel == "flex" or (kernel == "auto" and query.is_cuda)
    return wanted and tq == tk and isinstance(attention_mask, ModelMask)


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
    """Attention under the active run; shapes as transformers passes them.

    Through FlexAttention (a block policy's prefill on CUDA), PyTorch's fused kernel
    (:func:`_fused_attention`), or, with an observer or a softcap, the eager path that
    materialises the weights. query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D). Returns
    (B, Tq, H, D).
    """
    run = active()
    layer = module.layer_idx
    h, tq, tk = query.shape[1], query.shape[2], key.shape[2]
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    acts = run is not None and run.acts(layer)
    applies = acts and not run.leaves_dense(module, attention_mask)  # else as full attention
    if applies and softcap is None and run.uses_flex(query, tq, tk) and _OBSERVER.get() is None:
        causal = _causal(attention_mask, tq, module)
        if causal or _unpadded(attention_mask):
            model_mask = None if causal else attention_mask  # a sliding window, pair by pair
            out = run.flex_attention(layer, query, key, value, scaling, model_mask)
            return out.transpose(1, 2).contiguous(), None
    observer = _OBSERVER.get()
    masked = applies and run.policy.name != "full"
    if observer is None and softcap is None:
        keep = None
        if masked and run.chunks(tq):
            return chunked_attention(run, module, query, key, value, attention_mask, scaling)
        if masked:  # the policy's mask; scores only if it reads them
            visible = visible_mask(attention_mask, tq, tk, query.device)
            k = expand_kv(key, h)
            keep = run.mask(layer, query, k, visible, scaling, None, key.shape[1], module, value)
        return _fused_attention(run, acts, module, query, key, value, attention_mask, scaling, keep)
    k = expand_kv(key, h)  # (B, H, Tk, D)
    v = expand_kv(value, h)
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visible_mask(attention_mask, tq, tk, query.device)  # (B, 1, Tq, Tk)
    scores = torch.where(visible, scores, float("-inf"))
    if masked:
        keep = run.mask(layer, query, k, visible, scaling, scores, key.shape[1], module, value)
        scores = torch.where(keep, scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if run is not None:
        run.took("eager", tq)
    if run is not None and not masked:
        _unmasked_call(run, acts, module, query, key, value, visible, scaling, probs)
    if observer is not None:
        observer(layer, query, probs)
    out = torch.matmul(probs.to(value.dtype), v)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def _fused_attention(run, acts, module, query, key, value, attention_mask, scaling, keep=None):
    """Attention through fused kernels (no float (Tq, Tk) weights in memory): SDPA under
    the policy's ``keep`` mask (B, H, Tq, Tk) when given, else over every key the model's
    own mask allows (full attention, and the calls where the policy does not act): SDPA
    with ``is_causal`` for a plain causal prefill, FlexAttention under the model's mask for
    a sliding-window prefill on CUDA, SDPA under the dense mask otherwise (decode steps). A
    ``cache``-regime prefill hands the run what its policy needs. Returns (B, Tq, H, D)."""
    tq = query.shape[2]
    with phase("attention"):
        out, kernel = _fused_kernel(query, key, value, attention_mask, scaling, keep, module)
    if run is not None:
        run.took(kernel, tq)
    if run is not None and keep is None:
        _unmasked_call(run, acts, module, query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _fused_kernel(query, key, value, attention_mask, scaling, keep, module):
    """:func:`_fused_attention`'s kernel call: (output (B, H, Tq, D), the kernel's name)."""
    h, tq, tk = query.shape[1], query.shape[2], key.shape[2]
    gqa = {"enable_gqa": True} if key.shape[1] != h else {}  # no copies of K and V
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if keep is not None:
        out, kernel = (
            sdpa(query, key, value, attn_mask=keep, scale=scaling, **gqa),
            "sdpa keep-mask",
        )
    elif tq == tk and _causal(attention_mask, tq, module):
        out, kernel = sdpa(query, key, value, is_causal=True, scale=scaling, **gqa), "sdpa causal"
    elif _window_flex(attention_mask, query, tq, tk):
        from attnlab.flex import dense_options, run_flex

        blocks, options = attention_mask.block_mask(query.device), dense_options(query.shape[-1])
        out, kernel = run_flex(query, key, value, blocks, scaling, options), "flex model mask"
    else:
        visible = visible_mask(attention_mask, tq, tk, query.device)
        out, kernel = (
            sdpa(query, key, value, attn_mask=visible, scale=scaling, **gqa),
            "sdpa model mask",
        )
    return out, kernel


def chunked_attention(run, module, query, key, value, attention_mask, scaling):
    """A token-level policy's call in chunks of ``run.row_chunk`` rows, each one call of
    the policy over the keys up to its last row, through PyTorch's fused kernel under its
    keep-mask: no (Tq, Tk) float matrix is held at once, only (B, H, row_chunk, Tk) ones
    (scores, weights and what the policy derives from them). The policy's state carries
    from chunk to chunk as from one decode step to the next (received attention, earlier
    queries, SnapKV's window), so a policy without eviction chooses exactly as in one
    call; an evicting one drops keys between chunks: each row chooses from the keys its
    chunk's cache held plus its chunk's own. query: (B, H, Tq, D); key, value:
    (B, Hkv, Tk, D). Returns (B, Tq, H, D)."""
    layer, h = module.layer_idx, query.shape[1]
    tq, tk = query.shape[2], key.shape[2]
    gqa = {"enable_gqa": True} if key.shape[1] != h else {}
    visible = visible_mask(attention_mask, tq, tk, query.device)  # (B, 1, Tq, Tk) bool
    out = torch.empty_like(query)
    run.took("sdpa keep-mask in row chunks", tq)
    for lo in range(0, tq, run.row_chunk):
        hi = min(lo + run.row_chunk, tq)
        end = tk - tq + hi  # the keys up to the chunk's last row
        q, k, v = query[..., lo:hi, :], key[..., :end, :], value[..., :end, :]
        vis = visible[..., lo:hi, :end]
        keep = run.mask(
            layer, q, expand_kv(k, h), vis, scaling, None, key.shape[1], module, v, hi == tq
        )
        with phase("attention"):
            out[..., lo:hi, :] = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, scale=scaling, **gqa
            )
    return out.transpose(1, 2).contiguous(), None


def _unmasked_call(run, acts, module, query, key, value, attention_mask, scaling, probs=None):
    """The run's record of a call without a policy mask: full attention's pairs where it
    acts; a dense prefill handed to a ``cache``-regime run and to the run's followers; the
    layer's prefill marked done. The model's mask is built as a tensor (B, 1, Tq, Tk) only
    for the cache regime's dense prefill (its followers' scores) and for calls other than
    a prefill; probs: the weights when computed."""
    layer, h = module.layer_idx, query.shape[1]
    tq, tk = query.shape[2], key.shape[2]
    observes = layer not in run.histories and (run.regime.dense_prefill or run.followers)
    if acts and tq == tk and isinstance(attention_mask, ModelMask):  # a prefill: no dense mask
        seen = attention_mask.visible_pairs(module, query)
        run.recorder.account_visible(layer, h, tq, tk, seen, attention_mask.last_row(query))
    elif acts:
        visible = visible_mask(attention_mask, tq, tk, query.device)
        run.recorder.account(layer, visible.expand(-1, h, -1, -1), visible)
    if observes:
        visible = visible_mask(attention_mask, tq, tk, query.device)
        k = expand_kv(key, h)
        run.observe_dense(layer, query, k, visible, scaling, key.shape[1], module, value, probs)
    run.histories.setdefault(layer, LayerHistory())


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Register the ``attnlab`` attention (and its mask builder) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, model_mask)
    model.set_attn_implementation(IMPLEMENTATION)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):  # an attention module
            if not getattr(module, "_attnlab_hooked", False):
                module.register_forward_pre_hook(_keep_inputs, with_kwargs=True)
                module._attnlab_hooked = True
    return model


def _keep_inputs(module, args, kwargs):
    """Hand a call's keyword inputs (hidden states, position embeddings) to the active
    run's policy when it reads them (``needs_inputs``); kept only for that call."""
    run = active()
    module._attnlab_inputs = kwargs if run is not None and run.needs_inputs else None
