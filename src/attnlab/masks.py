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

    def visible_pairs(self, module: torch.nn.Module) -> int:
        """The (query, key) pairs a prefill's mask shows, summed over the batch, with no
        (Tq, Tk) tensor: t (t + 1) / 2 a row where the mask is plain causal, else from its
        BlockMask, whole blocks by their area and partial ones (the window's edges, the
        diagonal) pair by pair."""
        if "pairs" not in self._built:
            self._built["pairs"] = self._count_pairs(module)
        return self._built["pairs"]

    def _count_pairs(self, module) -> int:
        bm = self.block_mask()
        q_len, kv_len = bm.seq_lengths
        b = bm.kv_num_blocks.shape[0]
        if self.plain_causal(module) and q_len == kv_len:
            return b * q_len * (q_len + 1) // 2
        qb, kb = bm.BLOCK_SIZE
        total = 0
        if bm.full_kv_num_blocks is not None:  # whole blocks: their area inside the lengths
            num, idx = bm.full_kv_num_blocks, bm.full_kv_indices  # (B, 1, Mq), (B, 1, Mq, Mk)
            listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
            rows = (q_len - torch.arange(num.shape[-1], device=idx.device) * qb).clamp(max=qb)
            cols = (kv_len - idx * kb).clamp(min=0, max=kb)
            total += int((listed * rows[:, None] * cols).sum())
        num, idx = bm.kv_num_blocks, bm.kv_indices  # partial blocks: the mask, pair by pair
        listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        bi, hi, qi, slot = torch.nonzero(listed, as_tuple=True)
        q = (qi * qb)[:, None, None] + torch.arange(qb, device=idx.device)[None, :, None]
        k = (idx[bi, hi, qi, slot] * kb)[:, None, None] + torch.arange(kb, device=idx.device)
        inside = (q < q_len) & (k < kv_len)
        seen = bm.mask_mod(bi[:, None, None], hi[:, None, None], q, k) & inside  # (P, qb, kb)
        return total + int(seen.sum())

    def last_row(self) -> torch.Tensor:
        """The last query row's visible keys: (B, 1, Tk) bool, from the mask's pattern."""
        bm = self.block_mask()
        q_len, kv_len = bm.seq_lengths
        b = bm.kv_num_blocks.shape[0]
        device = bm.kv_num_blocks.device
        batch = torch.arange(b, device=device)[:, None]
        kv = torch.arange(kv_len, device=device)[None, :]
        q = torch.full_like(kv, q_len - 1)
        return bm.mask_mod(batch, torch.zeros_like(batch), q, kv)[:, None, :]

    def unpadded(self) -> bool:
        """Whether no key is padding (the pattern alone decides)."""
        padding = self.recipe.get("attention_mask")
        return padding is None or bool(padding.all())

    def plain_causal(self, module: torch.nn.Module) -> bool:
        """Whether the mask is causal and nothing else (no window, no padding, no extra
        pattern): transformers' own test for skipping the mask (``allow_is_causal_skip``,
        ``local_size``), and the layer's ``sliding_window`` where the model has one."""
        return (
            self.recipe.get("allow_is_causal_skip", True)
            and self.recipe.get("local_size") is None
            and getattr(module, "sliding_window", None) is None
            and self.unpadded()
        )


def model_mask(**recipe) -> ModelMask:
    """The mask function registered for the ``attnlab`` attention (transformers'
    ``AttentionMaskInterface``): the recipe, nothing built yet."""
    return ModelMask(recipe)
