"""A sliding-window prefill's mask by formula: row q of a prefill of t tokens sees the keys
q - w < k <= q (transformers' ``sliding_window_causal_mask_function``).

What a block policy's prefill reads of the model's mask (rows, keys per key block, pairs
per block pair) computed from t, w and the block size alone: no (T, T) mask, no BlockMask
walked, no wait for the device. :func:`window_of` says when a mask is such a window;
:class:`attnlab.masks.ModelMask` then answers from here, on every device, with the values
its other paths read from the mask.
"""

from __future__ import annotations

import functools

import torch

from attnlab.blocks import n_blocks


def window_of(recipe: dict) -> int | None:
    """The window w of a mask recipe (the keywords transformers passes a mask function)
    that is a sliding window and nothing else over a prefill of t tokens (no offsets,
    0 < w < t), checked on its pattern's rows 0, 1, w - 1, w, w + 1 and t - 1 on the host;
    else None. Padding is the caller's to rule out."""
    w, t = recipe.get("local_size"), recipe.get("q_length")
    if not (isinstance(w, int) and isinstance(t, int) and 0 < w < t):
        return None
    if recipe.get("kv_length") != t or recipe.get("q_offset") != 0 or recipe.get("kv_offset"):
        return None
    rows = torch.tensor(sorted({0, 1, w - 1, w, w + 1, t - 1} & set(range(t))))
    zero = torch.zeros((), dtype=torch.long)
    want = window_rows(rows, t, w)[0, 0]
    try:
        seen = recipe["mask_function"](zero, zero, rows[:, None], torch.arange(t)[None, :])
        return w if torch.equal(torch.as_tensor(seen).bool().expand_as(want), want) else None
    except Exception:  # a pattern that does not take host tensors: not ours to read
        return None


@functools.cache
def window_mask_mod(w: int, q0: int = 0, k0: int = 0):
    """FlexAttention's ``mask_mod`` of the window, of rows from q0 over keys from k0 (one
    function per window and offsets, so a compiled kernel meets the same one every pass)."""
    if not (q0 or k0):

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx > q_idx - w)

        return mask_mod

    def shifted(b, h, q_idx, kv_idx):
        q, k = q_idx + q0, kv_idx + k0
        return (k <= q) & (k > q - w)

    return shifted


def window_rows(index: torch.Tensor, tk: int, w: int) -> torch.Tensor:
    """The visible keys of rows ``index`` (R,): (1, 1, R, Tk) bool."""
    k = torch.arange(tk, device=index.device)
    q = index[:, None]
    return ((k <= q) & (k > q - w))[None, None]


def _overlap(lo, hi, start, block_size: int, tk: int) -> torch.Tensor:
    """Keys lo..hi (inclusive, none where hi < lo) in the key blocks starting at
    ``start`` (broadcast together)."""
    end = (start + block_size).clamp(max=tk)
    return (torch.minimum(hi + 1, end) - torch.maximum(lo, start)).clamp(min=0)


def _keys_per_block(lo: torch.Tensor, hi: torch.Tensor, block_size: int, tk: int):
    """Keys lo..hi in each key block: (R,) -> (R, Mk)."""
    first = torch.arange(0, tk, block_size, device=lo.device)
    return _overlap(lo[:, None], hi[:, None], first, block_size, tk)


def window_block_counts(
    starts: torch.Tensor, ends: torch.Tensor, block_size: int, tk: int, w: int
) -> torch.Tensor:
    """Keys of each key block that row ``starts[i]`` or row ``ends[i]`` sees: the two
    windows' keys less their overlap. Returns (1, 1, R, Mk) long."""
    lo_s, lo_e = (starts - w + 1).clamp(min=0), (ends - w + 1).clamp(min=0)

    def keys(lo, hi):
        return _keys_per_block(lo, hi, block_size, tk)

    both = keys(torch.maximum(lo_s, lo_e), torch.minimum(starts, ends))
    return (keys(lo_s, starts) + keys(lo_e, ends) - both)[None, None]


def window_block_pairs(t: int, block_size: int, w: int, device=None) -> torch.Tensor:
    """Visible pairs per (query block, key block): each row's keys per key block over the
    few key blocks its query block's rows reach, summed per query block. Returns (Mq, Mk)
    long, as ``blocks.visible_block_pairs`` of the dense mask."""
    m = n_blocks(t, block_size)
    reach = -(-(w - 1) // block_size) + 2  # key blocks a query block's rows reach, at most
    span = torch.arange(reach, device=device)
    # each query block's first key block: that of its first row
    base = (torch.arange(m, device=device) * block_size - w + 1).clamp(min=0) // block_size
    q = torch.arange(t, device=device)
    block = q // block_size
    cols = base[block, None] + span  # (T, reach)
    lo, hi = (q - w + 1).clamp(min=0)[:, None], q[:, None]
    per_row = _overlap(lo, hi, cols * block_size, block_size, t)
    per = torch.zeros(m, reach, dtype=torch.long, device=device).index_add_(0, block, per_row)
    pairs = torch.zeros(m, m + reach, dtype=torch.long, device=device)  # spare columns
    pairs.scatter_(1, base[:, None] + span, per)
    return pairs[:, :m]


def window_pair_count(t: int, w: int) -> int:
    """Pairs a window shows over a prefill of t tokens: sum over q of min(q + 1, w)."""
    return w * (w + 1) // 2 + max(0, t - w) * w if t >= w else t * (t + 1) // 2


# the query rows of a tile of the model's own BlockMask (transformers builds it in 128s)
MODEL_TILE = 128
# a window layer's whole rows run apart in the model's tiles (``SparseRun.tiles = "auto"``)
# for blocks under WHOLE_BELOW tokens: the model's tiles beat 16-token ones, where 64-token
# tiles ran as fast and the second call cost more (results_ref/long_context/README.md)
WHOLE_BELOW = 64


def tile_form(tiles: str, block_size: int) -> str:
    """``SparseRun.tiles`` as a prefill runs it: "auto" is "whole" for blocks under
    WHOLE_BELOW tokens, else "block"; any other form as it is."""
    if tiles != "auto":
        return tiles
    return "whole" if block_size < WHOLE_BELOW else "block"


@functools.cache
def whole_from(t: int, block_size: int, w: int, sparsity: float, tile: int) -> int:
    """The first row of the last run of ``tile``-row query tiles of a prefill of t tokens
    (a multiple of ``tile``) under a window of w keys at ``sparsity`` whose every block may
    keep every key it sees: its keys (those its first or its last row sees) within the
    budget of its last row (the rows past about w / (1 - sparsity)); t where the last tile
    may not."""
    from attnlab.policies.base import row_budget

    starts = torch.arange(0, t, block_size)
    ends = (starts + block_size - 1).clamp(max=t - 1)
    fits = ends - (starts - w + 1).clamp(min=0) + 1 <= row_budget(ends + 1, sparsity)
    whole = fits.view(-1, tile // block_size).all(-1)
    short = torch.nonzero(~whole)
    return 0 if len(short) == 0 else (int(short[-1]) + 1) * tile


def whole_rows(model_mask, block_size: int, sparsity: float, device, tile: int = MODEL_TILE):
    """``flex_block_sparse_attention``'s ``whole`` for a prefill under ``model_mask`` (a
    :class:`~attnlab.masks.ModelMask`): under a plain sliding window, where the last query
    tiles of its BlockMask (``tile`` rows, a multiple of ``block_size`` above it, dividing
    the prefill) may keep every key their rows see (:func:`whole_from`), their first row r,
    the first key k0 they see (rounded down to a tile) and that BlockMask's rows from r
    over the keys from k0 (kept in the mask's store: once per forward pass); else None.
    A policy's rows past r keep every key they see only where it keeps what fits its
    budget (``BlockPolicy.keeps_what_fits``): the caller's to ask."""
    w, t = model_mask.window(), model_mask.recipe["q_length"]
    if w is None or model_mask.recipe["kv_length"] != t or t % tile or tile % block_size:
        return None
    r = whole_from(t, block_size, w, sparsity, tile) if tile > block_size else t
    if r >= t:
        return None
    store = model_mask.store
    if ("whole rows", r, tile) not in store:
        blocks = model_mask.block_mask(device)
        k0 = max(0, r - w + 1) // tile * tile
        made = None
        if blocks.BLOCK_SIZE == (tile, tile):
            made = r, k0, rows_of(blocks, r, k0, window_mask_mod(w, r, k0))
        store["whole rows", r, tile] = made
    return store["whole rows", r, tile]


def rows_of(blocks, r: int, k0: int, mask_mod):
    """The BlockMask ``blocks``' query rows from r over its keys from k0 (both multiples of
    its tiles), the pairs of ``mask_mod`` (the same pattern, shifted)."""
    from torch.nn.attention.flex_attention import BlockMask

    tq, tk = blocks.BLOCK_SIZE
    n_q, n_k = blocks.seq_lengths
    cols = -(-(n_k - k0) // tk)

    def part(num, idx):  # a row's listed key tiles are its first ``num``: all from k0 on
        if num is None:
            return None, None
        idx = (idx[..., r // tq :, :] - k0 // tk).clamp(min=0)[..., :cols]
        return num[..., r // tq :].contiguous(), idx.contiguous()

    return BlockMask.from_kv_blocks(
        *part(blocks.kv_num_blocks, blocks.kv_indices),
        *part(blocks.full_kv_num_blocks, blocks.full_kv_indices),
        BLOCK_SIZE=blocks.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=(n_q - r, n_k - k0),
        compute_q_blocks=False,
    )
