"""The model's own attention mask, kept as the recipe transformers hands over and built
as a tensor only where a path needs one.

transformers calls a registered mask function once per forward pass and layer type
(global, sliding window) with the mask's recipe: lengths, offsets, the 2D padding mask,
and ``mask_function(b, h, q_idx, kv_idx)``, the pattern itself (causal, a window). The
``attnlab`` attention registers :func:`model_mask`, which keeps that recipe in a
:class:`ModelMask`. A plain causal layer then runs PyTorch's fused kernel with
``is_causal`` and a sliding-window layer FlexAttention with a ``BlockMask`` of the same
pattern (O((T / 128)^2) memory), so full attention holds no (T, T) tensor; a path that
reads the mask as a tensor (a policy's keep-mask, the run's accounting) builds the dense
bool mask once per forward pass and layer type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class ModelMask:
    """One forward pass's mask of one layer type, as transformers describes it
    (``recipe``: the keyword arguments of its mask functions)."""

    recipe: dict
    _built: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor:
        """(B, 1, Tq, Tk) bool, True where a key may be seen."""
        if "dense" not in self._built:
            from transformers.masking_utils import sdpa_mask

            recipe = {**self.recipe, "allow_is_causal_skip": False}
            self._built["dense"] = sdpa_mask(**recipe, allow_is_bidirectional_skip=False)
        return self._built["dense"]

    def block_mask(self):
        """The same pattern as a FlexAttention ``BlockMask`` (blocks of 128 tokens)."""
        if "blocks" not in self._built:
            from transformers.masking_utils import flex_attention_mask

            self._built["blocks"] = flex_attention_mask(**self.recipe)
        return self._built["blocks"]

    def plain_causal(self, module: torch.nn.Module) -> bool:
        """Whether the mask is causal and nothing else (no window, no padding, no extra
        pattern): transformers' own test for skipping the mask (``allow_is_causal_skip``,
        ``local_size``), and the layer's ``sliding_window`` where the model has one."""
        padding = self.recipe.get("attention_mask")
        return (
            self.recipe.get("allow_is_causal_skip", True)
            and self.recipe.get("local_size") is None
            and getattr(module, "sliding_window", None) is None
            and (padding is None or bool(padding.all()))
        )


def model_mask(**recipe) -> ModelMask:
    """The mask function registered for the ``attnlab`` attention (transformers'
    ``AttentionMaskInterface``): the recipe, nothing built yet."""
    return ModelMask(recipe)
