"""A block policy's prefill through FlexAttention: the GPU's path (``SparseRun.backend``
"auto" on CUDA, "flex" anywhere), a mixin of :class:`attnlab.sparse.SparseRun`.

Each layer's selection is the run's own (:meth:`~attnlab.sparse.SparseRun.block_selection`,
the same on every path), made once per query block, in the fused Triton kernel on CUDA;
what every layer under one mask reads (rows, counts per block, bands, pairs) is built once
per forward pass and kept in that mask's store (a causal prefill's, on the run). Under a
sliding window, the rows past the budget's reach keep every key they see and run as the
model's own mask (``windows.whole_rows``); the fused kernels choose for the rows before
them alone.
"""

from __future__ import annotations

import functools

import torch

from attnlab.blocks import causal_block_pairs, expand_kv
from attnlab.masks import causal_block_counts, causal_rows
from attnlab.phases import phase
from attnlab.policies.base import row_budget


class BlockPrefill:
    """:class:`~attnlab.sparse.SparseRun`'s prefill of a block policy through
    FlexAttention: reads the run's policy, sparsity, ``fused``, ``tiles``, recorder and
    its causal prefill's store."""

    def uses_flex(self, query: torch.Tensor, tq: int, tk: int) -> bool:
        """Whether a call runs through FlexAttention: a block policy's prefill, on CUDA
        (``backend="auto"``) or wherever ``backend="flex"`` asks (else a keep-mask)."""
        wanted = self.backend == "flex" or (self.backend == "auto" and query.is_cuda)
        return wanted and self.policy.level == "block" and tq == tk

    def block_mask(
        self,
        layer,
        q,
        k,
        scaling,
        kv_heads=None,
        model_mask=None,
        lists=None,
        pairs=None,
        chosen=None,
    ):
        """:meth:`block_selection` of a prefill for FlexAttention; q, k: (B, H, T, D);
        model_mask: the model's own :class:`~attnlab.masks.ModelMask` (a sliding window),
        causal when None. What the selection reads of the mask (rows, counts per block)
        is kept in the mask's store, or for a causal prefill on the run, for the next
        layers. ``chosen``: the query blocks that choose, the later ones keeping every key
        they see (``ScoreContext.chosen_blocks``). Returns (B, H, Mq, Mk) bool kept blocks
        (and the BlockMask's lists with ``lists``, see :meth:`block_selection`)."""
        cache, rows, counts, bands = self._pass_store(q, model_mask)
        ctx = self._context(layer, q, k, None, scaling, kv_heads, rows=rows, cache=cache)
        ctx.row_blocks, ctx.block_bands, ctx.chosen_blocks = counts, bands, chosen
        ctx.triton = lists is not None  # the fused path: the policy's Triton scores too
        keep = self.block_selection(ctx, lists, pairs)
        self.policy.remember(ctx)
        return keep

    def _pass_store(self, q: torch.Tensor, model_mask=None):
        """Where a prefill keeps what every layer under its mask reads (the mask's store,
        or for a causal prefill the run's, per length and device), how the mask's rows
        are built (for a causal prefill only the rows the selection reads), how the keys
        two rows of a query block see are counted per key block and the budget kernel's
        bands of those counts (causal: by formula; under the model's mask:
        :class:`~attnlab.masks.ModelMask`'s)."""
        if model_mask is None:
            t = q.shape[-2]

            def bands(count, _):
                from attnlab.kernels.budget import causal_bands

                return causal_bands(count.shape[-1], count.device)

            cache = self._causal_cache.setdefault((t, q.device), {})
            rows = functools.partial(causal_rows, tk=t)
            return cache, rows, functools.partial(causal_block_counts, tk=t), bands
        return model_mask.store, model_mask.rows, model_mask.block_counts, model_mask.block_bands

    def _pass_pairs(self, query: torch.Tensor, model_mask=None):
        """A prefill's visible pairs per (query block, key block) (Mq, Mk) long, their sum
        and the last row's visible keys (B or 1, 1, T) bool: once per forward pass and
        mask (every layer under it reads them)."""
        t, bs, dev = query.shape[-2], self.policy.block_size, query.device
        cache = self._pass_store(query, model_mask)[0]
        if ("pairs", bs) not in cache:
            if model_mask is None:
                pairs = causal_block_pairs(t, bs, dev)
                shown = causal_rows(torch.full((1,), t - 1, device=dev), t)[:, :, 0]
            else:
                pairs = model_mask.block_pairs(bs, dev)  # once per forward pass
                shown = model_mask.last_row(query)  # the last row's visible keys (B, 1, T)
            cache["pairs", bs] = pairs, pairs.sum(), shown
        return cache["pairs", bs]

    def flex_attention(self, layer, query, key, value, scaling, model_mask=None):
        """Prefill under a block policy through FlexAttention's block-sparse kernel, under
        the model's own mask where it is not plain causal (``model_mask``, a ModelMask: a
        sliding window), applied pair by pair. The selection reads the mask a set of rows
        at a time (a causal layer builds only those rows) and counts the kept pairs.

        query: (B, H, T, D); key, value: (B, Hkv, T, D). Returns (B, H, T, D).
        """
        from attnlab.flex import WINDOW_TILE, flex_block_sparse_attention
        from attnlab.windows import tile_form, whole_rows

        t, bs, (b, h) = query.shape[-2], self.policy.block_size, query.shape[:2]
        # the keys per query head the selection reads: one key/value head's a view, else copies
        k = key.expand(-1, h, -1, -1) if key.shape[1] == 1 else expand_kv(key, h)
        pairs, total, shown = self._pass_pairs(query, model_mask)
        fused = query.is_cuda and self.fused  # the selection and its lists in one kernel
        lists = (model_mask is not None) if fused else None
        mask = None if model_mask is None else model_mask.mask_mod(query.device)
        form = tile_form(self.tiles, bs)
        tile = WINDOW_TILE if form == "window" and mask is not None else None
        apart = form == "whole" and mask is not None and self.policy.keeps_what_fits()
        whole = whole_rows(model_mask, bs, self.sparsity, query.device) if apart else None
        # the fused kernels choose for the rows before the whole rows alone
        chosen = whole[0] // bs if whole is not None and fused else None
        with phase("selection"):
            keep = self.block_mask(
                layer, query, k, scaling, key.shape[1], model_mask, lists, pairs, chosen
            )
        keep, lists, kept = keep if fused else (keep, None, None)
        kernel = "flex block-sparse" + ("" if model_mask is None else ", model mask")
        kernel += ", whole tiles apart" if whole is not None else ""
        self.took(kernel + (", fused selection" if lists is not None else ""), t)
        recall = self.records and layer not in self.recorder.recall_sums
        watching = len(self.recorder.watch) > 0
        if recall or watching:  # the last row's kept keys (B, H, T)
            if chosen is not None:  # a whole row (not chosen): every key it sees
                last = shown.expand(b, h, t)
            else:
                last = keep[:, :, -1].repeat_interleave(bs, -1)[..., :t] & shown
        if recall:
            budget = row_budget(torch.full((1,), t, device=query.device), self.sparsity)
            self.recorder.record_recall(  # the keys repeated, as every path records them
                layer, query[..., -1, :], expand_kv(key, h), shown, scaling, last, budget[None]
            )
        # summed on the device (by the fused kernel, else over heads first), read once
        kept = (keep.sum((0, 1), dtype=torch.int32) * pairs).sum() if kept is None else kept
        self.recorder.count(b, h, t, t, kept, b * total)
        if watching:
            self.recorder.note_needle(layer, last, shown)
        with phase("attention"):
            return flex_block_sparse_attention(
                query, key, value, keep, bs, scaling, mask, lists, tile, whole
            )
