"""Hooks at the model's RoPE call: where Q and K are after any QK-norm, before rotation.

Hugging Face attention modules call their modeling module's ``apply_rotary_pos_emb(q, k,
cos, sin)`` once per layer, after the projections and any QK-norm (Gemma 3, Qwen 3) and
before the attention itself. :func:`at_rope` wraps that call for the duration of a
``with`` block, so a stage can read Q and K there (capture) or change them (the
query-scaling intervention) without knowing the architecture.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from attnlab.errors import UserError


def decoder_layers(model):
    """The model's decoder layers (``model.model.layers``), each with ``self_attn``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn"):
        raise UserError(f"{type(model).__name__} has no model.layers[i].self_attn to hook")
    return layers


def check_layers(model, layers, key: str) -> None:
    """A clear error for layer indices the model does not have; ``key`` names the setting."""
    n = len(decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UserError(f"{key} {bad} outside the model's layers 0..{n - 1}")


@contextlib.contextmanager
def at_rope(model, before: Callable | None = None, after: Callable | None = None) -> Iterator[None]:
    """Call ``before`` and ``after`` around every layer's RoPE while the block runs.

    q: (B, H, T, D), k: (B, Hkv, T, D). ``before`` returns the (q, k) that RoPE then
    rotates; ``after`` sees the inputs and the rotated outputs.
    """
    decoder = decoder_layers(model)
    module = sys.modules[type(decoder[0].self_attn).__module__]
    rope = getattr(module, "apply_rotary_pos_emb", None)
    if rope is None:
        raise UserError(
            f"{module.__name__} has no apply_rotary_pos_emb: Q/K hooks need a RoPE model"
        )
    current = [-1]

    def hooked(q, k, cos, sin, *args, **kwargs):
        if before is not None:
            q, k = before(current[0], q, k)
        q_rot, k_rot = rope(q, k, cos, sin, *args, **kwargs)
        if after is not None:
            after(current[0], q, k, q_rot, k_rot)
        return q_rot, k_rot

    handles = [
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i))
        for i, layer in enumerate(decoder)
    ]
    module.apply_rotary_pos_emb = hooked
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = rope
        for h in handles:
            h.remove()
