"""The model's own attention mask, kept as the recipe transformers hands over and built
as a tensor only where a path needs one.

transformers calls a registered mask function once per forward pass and layer type
(global, sliding window) with the mask's recipe: lengths, offsets, the 2D padding mask,
and ``mask_function(b, h, q_idx, kv_idx)``, the pattern itself (causal, a window). The
``attnlab`` attention registers :func:`model_mask`, which keeps that recipe in a
:class:`ModelMask`. A plain causal layer then runs PyTorch's fused kernel with
``is_causal`` and a sliding-window layer FlexAttention with a ``BlockMask`` of the same
pattern (O((T / 128)^2) memory), so full attention holds no (T, T) tensor; what a block
policy's prefill reads of a plain sliding window (rows, keys per block, pairs) are
formulas of the window (:mod:`attnlab.windows`); a path that reads the mask as a tensor
(a policy's keep-mask, the run's accounting) builds the dense bool mask once per forward
pass and layer type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnlab.blocks import visible_per_block
from attnlab.windows import (
    window_block_counts,
    window_block_pairs,
    window_mask_mod,
    window_of,
    window_pair_count,
    window_rows,
)


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

    def block_mask(self, device):
        """The same pattern as a FlexAttention ``BlockMask`` (blocks of 128 tokens). On CUDA
        transformers builds it from the pattern (``flex_attention_mask``, no (T, T)
        tensor); elsewhere from the dense mask, whose pairs its ``mask_mod`` looks up
        (building it from the pattern compiles C++ code on the CPU)."""
        if "blocks" not in self._built:
            if torch.device(device).type == "cuda":
                from transformers.masking_utils import flex_attention_mask

                self._built["blocks"] = flex_attention_mask(**self.recipe)
            else:
                self._built["blocks"] = _block_mask_of(self.dense())
        return self._built["blocks"]

    def mask_mod(self, device):
        """The pattern as FlexAttention's ``mask_mod``: a plain sliding window's by formula
        (no BlockMask built), else that of :meth:`block_mask`."""
        if self.window() is not None:
            return window_mask_mod(self.window())
        return self.block_mask(device).mask_mod

    def visible_pairs(self, module: torch.nn.Module, query: torch.Tensor) -> int:
        """The (query, key) pairs a prefill's mask shows, summed over the batch, for
        ``query`` (B, H, T, D): B t (t + 1) / 2 where the mask is plain causal, by formula
        under a plain sliding window; on CUDA from the BlockMask, whole blocks by their
        area and partial ones (the window's edges, the diagonal) pair by pair, with no (T,
        T) tensor; elsewhere from the dense mask."""
        if "pairs" not in self._built:
            b, t = query.shape[0], query.shape[-2]
            if self.plain_causal(module):
                pairs = b * t * (t + 1) // 2
            elif self.window() is not None:
                pairs = b * window_pair_count(t, self.window())
            elif query.is_cuda:
                pairs = _block_mask_pairs(self.block_mask(query.device))
            else:
                pairs = int(torch.count_nonzero(self.dense()))
            self._built["pairs"] = pairs
        return self._built["pairs"]

    def block_pairs(self, block_size: int, device=None) -> torch.Tensor:
        """Visible pairs per (query block, key block) of a prefill under this mask (its
        first batch row), (Mq, Mk) long; counted once per forward pass and block size,
        for every layer of this type. By formula under a plain sliding window; on CUDA from
        the BlockMask (:func:`pairs_per_block`, no (T, T) tensor), elsewhere from the
        dense mask."""
        key = ("block_pairs", block_size)
        if key not in self._built:
            from attnlab.blocks import visible_block_pairs

            bm = self.block_mask(device) if _is_cuda(device) else None
            if self.window() is not None:
                t, dev = self.recipe["q_length"], device or self.recipe.get("device")
                self._built[key] = window_block_pairs(t, block_size, self.window(), dev)
            elif bm is not None and all(b % block_size == 0 for b in bm.BLOCK_SIZE):
                self._built[key] = pairs_per_block(bm, block_size)
            else:
                self._built[key] = visible_block_pairs(self.dense()[0, 0], block_size)
        return self._built[key]

    @property
    def store(self) -> dict:
        """What this forward pass has built from the mask, for every layer of its type
        (a block policy's prefill keeps what its selection reads here)."""
        return self._built

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The visible keys of the query rows ``index`` (R,): (B, 1, R, Tk) bool. On CUDA
        from the mask's pattern over the key blocks its BlockMask lists for each row
        (:func:`rows_of_block_mask`: no (T, T) tensor, nor an (R, T) pattern to evaluate),
        elsewhere read from the dense mask; by formula under a plain sliding window."""
        if self.window() is not None:
            return window_rows(index, self.recipe["kv_length"], self.window())
        if not index.is_cuda or "dense" in self._built:
            return self.dense()[:, :, index]
        return rows_of_block_mask(self.block_mask(index.device), index, self._built)

    def block_counts(self, starts: torch.Tensor, ends: torch.Tensor, block_size: int):
        """Keys of each key block of ``block_size`` that the row ``starts[i]`` or the row
        ``ends[i]`` sees (both rows of one query block): (B, 1, R, Mk) long. On CUDA from
        the pattern over the listed blocks (:func:`block_counts_of_block_mask`), elsewhere
        from the dense mask's rows; by formula under a plain sliding window."""
        if self.window() is not None:
            tk = self.recipe["kv_length"]
            return window_block_counts(starts, ends, block_size, tk, self.window())
        bm = self.block_mask(starts.device) if starts.is_cuda else None
        if bm is None or "dense" in self._built or any(b % block_size for b in bm.BLOCK_SIZE):
            return visible_per_block(self.rows(starts) | self.rows(ends), block_size)
        return block_counts_of_block_mask(bm, starts, ends, block_size, self._built)

    def last_row(self, query: torch.Tensor) -> torch.Tensor:
        """The last query row's visible keys: (B, 1, Tk) bool, from the mask's pattern on
        CUDA or under a plain sliding window, from the dense mask elsewhere."""
        if not query.is_cuda and self.window() is None:
            return self.dense()[:, :, -1]
        last = torch.full((1,), query.shape[-2] - 1, device=query.device)
        return self.rows(last)[:, :, 0]

    def block_bands(self, count: torch.Tensor, block_size: int):
        """The budget kernel's bands (:func:`attnlab.kernels.budget.row_bands`) of the
        counts :meth:`block_counts` gave: by formula under a plain sliding window, else
        read from the counts (one wait for the device)."""
        from attnlab.kernels.budget import row_bands, window_bands

        if self.window() is None:
            return row_bands(count)
        return window_bands(self.recipe["q_length"], block_size, self.window(), count.device)

    def window(self) -> int | None:
        """The window w where this mask is a sliding window and nothing else over an
        unpadded prefill (:func:`attnlab.windows.window_of`): its rows, counts and pairs
        are then formulas of w, on every device. Found once per forward pass."""
        if "window" not in self._built:
            self._built["window"] = window_of(self.recipe) if self.unpadded() else None
        return self._built["window"]

    def unpadded(self) -> bool:
        """Whether no key is padding (the pattern alone decides); read once per forward
        pass (a padding mask's read waits for the device)."""
        if "unpadded" not in self._built:
            padding = self.recipe.get("attention_mask")
            self._built["unpadded"] = padding is None or bool(padding.all())
        return self._built["unpadded"]

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


def _block_mask_pairs(bm) -> int:
    """The pairs a BlockMask shows: its whole blocks by their area inside the lengths,
    its partial blocks pair by pair through its ``mask_mod``."""
    q_len, kv_len = bm.seq_lengths
    qb, kb = bm.BLOCK_SIZE
    total = 0
    if bm.full_kv_num_blocks is not None:
        num, idx = bm.full_kv_num_blocks, bm.full_kv_indices  # (B, 1, Mq), (B, 1, Mq, Mk)
        listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        rows = (q_len - torch.arange(num.shape[-1], device=idx.device) * qb).clamp(max=qb)
        cols = (kv_len - idx * kb).clamp(min=0, max=kb)
        total += int((listed * rows[:, None] * cols).sum())
    num, idx = bm.kv_num_blocks, bm.kv_indices
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    bi, hi, qi, slot = torch.nonzero(listed, as_tuple=True)
    q = (qi * qb)[:, None, None] + torch.arange(qb, device=idx.device)[None, :, None]
    k = (idx[bi, hi, qi, slot] * kb)[:, None, None] + torch.arange(kb, device=idx.device)
    inside = (q < q_len) & (k < kv_len)
    seen = bm.mask_mod(bi[:, None, None], hi[:, None, None], q, k) & inside  # (P, qb, kb)
    return total + int(seen.sum())


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def pairs_per_block(bm, block_size: int) -> torch.Tensor:
    """The visible pairs of a BlockMask (its first batch row and head) per (query block,
    key block) of ``block_size`` tokens, which must divide its own blocks: its whole
    blocks by their area inside the lengths, its partial ones pair by pair through its
    ``mask_mod``. Returns (Mq, Mk) long, Mq = ceil(q_len / block_size)."""
    q_len, kv_len = bm.seq_lengths
    qb, kb = bm.BLOCK_SIZE
    rq, rk = qb // block_size, kb // block_size
    dev = bm.kv_indices.device
    mq, mk = -(-q_len // qb), -(-kv_len // kb)  # the BlockMask's own blocks
    pairs = torch.zeros(mq * rq, mk * rk, dtype=torch.long, device=dev)
    lists = [(bm.kv_num_blocks, bm.kv_indices, False)]
    if bm.full_kv_num_blocks is not None:
        lists.append((bm.full_kv_num_blocks, bm.full_kv_indices, True))
    zero = torch.zeros(1, 1, 1, dtype=torch.long, device=dev)
    for num, idx, whole in lists:
        num, idx = num[0, 0, :mq], idx[0, 0, :mq]  # (Mq,), (Mq, Mk)
        listed = torch.arange(idx.shape[-1], device=dev) < num[:, None]
        qi, slot = torch.nonzero(listed, as_tuple=True)
        kj = idx[qi, slot].long()
        q = (qi * qb)[:, None, None] + torch.arange(qb, device=dev)[None, :, None]
        k = (kj * kb)[:, None, None] + torch.arange(kb, device=dev)[None, None, :]
        seen = (q < q_len) & (k < kv_len)  # (P, qb, kb)
        if not whole:
            seen = seen & bm.mask_mod(zero, zero, q, k)
        per = seen.view(-1, rq, block_size, rk, block_size).sum((2, 4))  # (P, rq, rk)
        rows = (qi[:, None] * rq + torch.arange(rq, device=dev))[:, :, None].expand(-1, rq, rk)
        cols = (kj[:, None] * rk + torch.arange(rk, device=dev))[:, None, :].expand(-1, rq, rk)
        pairs.index_put_((rows, cols), per, accumulate=True)
    return pairs[: -(-q_len // block_size), : -(-kv_len // block_size)]


def _listed(bm, store: dict | None = None):
    """Every key block a BlockMask lists (partial or full) for each of its query blocks,
    head 0: ids (B, Mq, N) long and whether listed (B, Mq, N) bool, N the most any query
    block lists (one wait for the device, once per ``store``: a forward pass's mask)."""
    if store is not None and "listed" in store:
        return store["listed"]
    lists = [(bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)]
    lists = [(num, idx) for num, idx in lists if num is not None]
    most = torch.stack([num.max() for num, _ in lists]).tolist()  # the one wait
    ids, ok = [], []
    for (num, idx), n in zip(lists, most, strict=True):
        ids.append(idx[:, 0, :, :n].long())
        ok.append(torch.arange(n, device=idx.device) < num[:, 0, :, None])
    out = torch.cat(ids, -1), torch.cat(ok, -1)
    if store is not None:
        store["listed"] = out
    return out


def _listed_keys(bm, index: torch.Tensor, store: dict | None):
    """The keys of the blocks listed for each row of ``index`` (R,): keys (B, R, N * kb)
    long (clamped within the lengths), whether each is listed and inside them (B, R,
    N * kb) bool, the block ids (B, R, N) and whether listed (B, R, N)."""
    ids, ok = _listed(bm, store)
    qb, kb = bm.BLOCK_SIZE
    kv_len = bm.seq_lengths[1]
    parent = index // qb
    ids, ok = ids[:, parent], ok[:, parent]  # (B, R, N)
    keys = ids[..., None] * kb + torch.arange(kb, device=index.device)  # (B, R, N, kb)
    inside = (ok[..., None] & (keys < kv_len)).flatten(-2)
    return keys.clamp(max=kv_len - 1).flatten(-2), inside, ids, ok


def _sees(bm, index: torch.Tensor, keys: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Whether each row of ``index`` (R,) sees its listed ``keys`` (B, R, K): (B, R, K)."""
    batch = torch.arange(keys.shape[0], device=index.device)[:, None, None]
    seen = bm.mask_mod(batch, torch.zeros_like(batch), index[None, :, None], keys)
    return seen & inside


KEYS_AT_ONCE = 1 << 24  # listed keys read per step (int64 positions: 128 MiB a batch row)


def _row_steps(bm, index: torch.Tensor, store: dict | None):
    """``index`` in steps of rows whose listed keys number at most KEYS_AT_ONCE (one step
    under a window; more where every block is listed), so no step's positions outgrow
    a dense row's."""
    n = _listed(bm, store)[0].shape[-1] * bm.BLOCK_SIZE[1]
    step = max(1, KEYS_AT_ONCE // max(1, n))
    return [(i, index[i : i + step]) for i in range(0, index.shape[0], step)]


def rows_of_block_mask(bm, index: torch.Tensor, store: dict | None = None) -> torch.Tensor:
    """The visible keys of the rows ``index`` (R,) of a BlockMask's pattern: its
    ``mask_mod`` read only on the key blocks listed for each row's query block, every
    other key unseen. Returns (B, 1, R, Tk) bool, the dense mask's rows."""
    kv_len = bm.seq_lengths[1]
    b = bm.kv_num_blocks.shape[0]
    out = torch.zeros(b, index.shape[0], kv_len + 1, dtype=torch.bool, device=index.device)
    for i, rows in _row_steps(bm, index, store):
        keys, inside, _, _ = _listed_keys(bm, rows, store)
        seen = _sees(bm, rows, keys, inside)
        # keys outside the lists or the lengths go to a spare column: no two writes collide
        out[:, i : i + rows.shape[0]].scatter_(2, torch.where(seen, keys, kv_len), seen)
    return out[:, None, :, :kv_len]


def block_counts_of_block_mask(
    bm, starts: torch.Tensor, ends: torch.Tensor, block_size: int, store: dict | None = None
) -> torch.Tensor:
    """Keys of each key block of ``block_size`` (dividing the BlockMask's blocks) that the
    row ``starts[i]`` or ``ends[i]`` (of one query block of the BlockMask) sees, read on
    the listed blocks alone: (B, 1, R, Mk) long, ``visible_per_block`` of the rows'
    union."""
    kv_len = bm.seq_lengths[1]
    mk, per = -(-kv_len // block_size), bm.BLOCK_SIZE[1] // block_size
    b = bm.kv_num_blocks.shape[0]
    out = torch.zeros(b, starts.shape[0], mk + 1, dtype=torch.long, device=starts.device)
    for i, rows in _row_steps(bm, starts, store):
        # a query block's two rows share its listed blocks: their keys are built once
        keys, inside, ids, ok = _listed_keys(bm, rows, store)
        last = ends[i : i + rows.shape[0]]
        seen = _sees(bm, rows, keys, inside) | _sees(bm, last, keys, inside)
        r, n = ids.shape[1:]
        sums = seen.view(b, r, n, per, block_size).sum(-1)  # (B, R, N, per)
        cols = ids[..., None] * per + torch.arange(per, device=ids.device)
        cols = torch.where(ok[..., None] & (cols < mk), cols, mk).flatten(-2)
        # unlisted blocks go to a spare column
        out[:, i : i + r].scatter_(2, cols, sums.flatten(-2))
    return out[:, None, :, :mk]


def causal_block_counts(
    starts: torch.Tensor, ends: torch.Tensor, block_size: int, tk: int
) -> torch.Tensor:
    """:meth:`ModelMask.block_counts` of a plain causal prefill of ``tk`` tokens, by
    formula: a window as long as the prompt. Returns (1, 1, R, Mk) long."""
    return window_block_counts(starts, ends, block_size, tk, tk)


def causal_rows(index: torch.Tensor, tk: int) -> torch.Tensor:
    """The visible keys of rows ``index`` (R,) of a plain causal prefill of ``tk`` tokens:
    (1, 1, R, Tk) bool."""
    return window_rows(index, tk, tk)


def _block_mask_of(dense: torch.Tensor, block: int = 128):
    """A BlockMask of a dense mask (B, 1, Tq, Tk) bool: every block holding a visible pair
    listed as partial, its ``mask_mod`` a look-up into the mask."""
    from torch.nn.attention.flex_attention import BlockMask

    from attnlab.flex import ordered_blocks

    b, _, tq, tk = dense.shape
    mq, mk = -(-tq // block), -(-tk // block)
    padded = torch.nn.functional.pad(dense, (0, mk * block - tk, 0, mq * block - tq))
    shown = padded.view(b, 1, mq, block, mk, block).any(5).any(3)  # (B, 1, Mq, Mk)
    num, idx = ordered_blocks(shown)

    def mask_mod(batch, head, q_idx, kv_idx):
        return padded[batch, 0, q_idx, kv_idx]

    return BlockMask.from_kv_blocks(
        num, idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(tq, tk)
    )


def visible_mask(attention_mask, tq: int, tk: int, device) -> torch.Tensor:
    """The model's own mask (None, a :class:`ModelMask` or a tensor) as
    bool (B or 1, 1, Tq, Tk), True where a key may be seen."""
    if isinstance(attention_mask, ModelMask):
        attention_mask = attention_mask.dense()
    if attention_mask is None:
        q_pos = torch.arange(tk - tq, tk, device=device).unsqueeze(-1)
        return (torch.arange(tk, device=device) <= q_pos)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :tk]
    return attention_mask[..., :tk] > torch.finfo(attention_mask.dtype).min / 2
