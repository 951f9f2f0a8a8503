"""Block-sparse causal attention through FlexAttention.

A block selection becomes a ``BlockMask`` built directly from per-query-block lists of key
blocks (``BlockMask.from_kv_blocks``): blocks kept and wholly below the diagonal go in the
"full" lists and skip the mask function; blocks on the diagonal go in the "partial" lists
and get the causal ``mask_mod``. On CUDA ``flex_attention`` runs compiled (one Triton
kernel that visits only the listed blocks); on the CPU it runs eagerly, which materialises
the scores and is meant for tests and small runs.

Tile sizes. The flex kernel's tile (BLOCK_M query rows x BLOCK_N keys) must divide the
BlockMask's blocks. On the H100 its default for D = 128 in bf16 is 128 x 64, so a 128 x 64
BlockMask runs the tuned default, while 64 x 64 blocks need BLOCK_M = 64, which compiles
but ran 7.3 ms at 1.1% density at 128k where 128-token blocks ran 5.35 ms at 1.2%
(issue 9). ``flex_block_sparse_attention`` keeps a caller's selection exact, so its blocks
are square and smaller blocks get smaller tiles; the CAB path selects per 128-token query
block over 64-token key blocks and goes through ``flex_attention_from_selection`` (4.6 ms
at 0.9% density at 128k, H = 32, on the H100).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from attnlab.blocks import n_blocks

# the tile in which a selection of 16-token blocks may run under a sliding window (query
# x key tokens, :func:`tiled_block_mask`; ``SparseRun.tiles = "window"``). Alone, at
# Gemma 3's shapes on one H100 (32k, D = 256, a 512-key window) it took 0.55-0.60 ms a
# layer at 90-95% where 16 x 16 tiles took 0.86-0.93 (the dense window 0.42), and as
# long at 99% (benchmarks_ref/flex_tiles_h100.txt); in the real prefill its lists cost
# about what it gains: 1.1-5.3 ms faster at 90%, 1.8-9.9 slower at 99% (results_ref)
WINDOW_TILE = (64, 16)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex():
    # one compilation per shape and block layout; a benchmark sweep makes more than the
    # default limit of 8 allows before torch falls back to the eager (dense) kernel
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


# Launch settings at head dim 256 (Gemma 3's), measured on one H100 at Gemma-3-270M's 32k
# shapes (benchmarks_ref/flex_launch_h100.txt), each with the default's output bit for bit
# (tests/test_flex.py): a 16-row tile in 2 warps, not the default 4 (a block-sparse layer
# of 16-token blocks at 95%: 1.41 -> 0.95 ms; at 99% 0.33 -> 0.24; at head dim 16 2 warps
# round otherwise, and other head dims were not measured, so they keep flex's defaults),
# and flex's default tiles (64 x 32 in bf16 on the H100) through 2 pipeline stages, not 3:
# the model's own dense window in 128-token blocks 0.35 -> 0.28 ms, a block-sparse layer
# of 128-token blocks 0.45 -> 0.38 at 95% (64 x 64 tiles ran slower in 2 stages and keep 3)
TUNED_HEAD = 256
SMALL_TILE_WARPS = 2
WIDE_HEAD_STAGES = 2


def kernel_options(q_block: int, kv_block: int, head_dim: int = 0) -> dict | None:
    """Flex tile sizes (and the launch settings above, for ``head_dim`` channels) for a
    BlockMask of q_block x kv_block tokens, or None for defaults."""
    opts = {}
    if q_block < 128:
        opts["BLOCK_M"] = q_block
    if q_block <= 16 and head_dim == TUNED_HEAD:
        opts["num_warps"] = SMALL_TILE_WARPS
    if kv_block < 64:
        opts["BLOCK_N"] = kv_block
    elif kv_block == 64:
        opts["BLOCK_N"] = 64  # D <= 64 defaults to 128-key tiles on the H100
    return opts or dense_options(head_dim)


def dense_options(head_dim: int) -> dict | None:
    """Launch settings of flex's default tiles (the model's own BlockMask, blocks of 128
    tokens or more): 2 pipeline stages at head dim 256 (Gemma 3's, measured), whose
    default tiles run 3; else None (other head dims take other default tiles)."""
    return {"num_stages": WIDE_HEAD_STAGES} if head_dim == TUNED_HEAD else None


def run_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scaling: float,
    options: dict | None = None,
) -> torch.Tensor:
    """flex_attention, compiled on CUDA, eager elsewhere. q: (B, H, N, D); k, v: (B, Hkv, N, D)."""
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        return _compiled_flex()(
            q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa, kernel_options=options
        )
    block_mask = _fold_lists_into_mask_mod(block_mask, q.shape[0], q.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _fold_lists_into_mask_mod(block_mask: BlockMask, b: int, h: int) -> BlockMask:
    """The eager (CPU) flex kernel applies mask_mod alone and ignores the block lists."""
    dense = block_mask.to_dense().bool()
    dense = dense.expand(b, h, *dense.shape[2:])  # (B, H, Mq, Mk) kept blocks
    q_block, kv_block = block_mask.BLOCK_SIZE
    inner = block_mask.mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx, kv_idx) & dense[b, h, q_idx // q_block, kv_idx // kv_block]

    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=mask_mod,
        seq_lengths=block_mask.seq_lengths,
        compute_q_blocks=False,
    )


def causal_block_mask(n: int, device: torch.device | str, block_size: int = 128) -> BlockMask:
    """Dense causal BlockMask over n tokens, broadcast over batch and heads.

    Built from its block lists: ``create_block_mask`` would materialise all n x n token
    pairs (128 GiB at 128k tokens).
    """
    m = n_blocks(n, block_size)
    keep = torch.ones(1, 1, m, m, dtype=torch.bool, device=device)
    return block_mask_from_keep(keep, block_size, n)


def ordered_blocks(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Mq, Mk) bool -> number kept (B, H, Mq) and their indices, kept first, ascending."""
    num = keep.sum(-1, dtype=torch.int32)
    idx = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def listed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ordered_blocks` without a sort: the kept indices ascending first, by a prefix
    sum; the entries after them are never read (flex reads a row's first ``num``)."""
    mk = keep.shape[-1]
    slot = keep.cumsum(-1, dtype=torch.int32)
    num = slot[..., -1].contiguous()
    slot = torch.where(keep, slot - 1, mk - 1).long()  # the unkept all write the last slot
    cols = torch.arange(mk, dtype=torch.int32, device=keep.device).expand_as(slot)
    idx = torch.zeros(keep.shape, dtype=torch.int32, device=keep.device)
    return num, idx.scatter_(-1, slot, torch.where(keep, cols, 0))


def block_mask_from_keep(
    block_keep: torch.Tensor, block_size: int, n: int, mask_mod=None
) -> BlockMask:
    """BlockMask attending token pairs (q, k) with k <= q and block_keep[b, h, q // bs, k // bs].

    block_keep: (B, H, M, M) bool, M = ceil(n / block_size); blocks above the diagonal are
    ignored. Blocks strictly below the diagonal are full, diagonal blocks partial. With a
    ``mask_mod`` (the model's own mask: a sliding window) every kept block is partial,
    that mask applied pair by pair.
    """
    lists = keep_lists(block_keep, mask_mod is not None)
    return block_mask_from_lists(lists, block_size, n, mask_mod)


def keep_lists(block_keep: torch.Tensor, all_partial: bool) -> tuple:
    """The lists (full_num, full_idx, part_num, part_idx) of :func:`block_mask_from_keep`:
    blocks strictly below the diagonal full, diagonal ones partial, or (``all_partial``,
    under the model's own mask) every kept block at or left of the diagonal partial and no
    full lists."""
    m = block_keep.shape[-1]
    below = torch.ones(m, m, dtype=torch.bool, device=block_keep.device).tril(-1)
    diag = torch.eye(m, dtype=torch.bool, device=block_keep.device)
    if all_partial:
        return (None, None, *ordered_blocks(block_keep & (below | diag)))
    return (*ordered_blocks(block_keep & below), *ordered_blocks(block_keep & diag))


def block_mask_from_lists(lists, block_size: int, n: int, mask_mod=None) -> BlockMask:
    """The BlockMask of :func:`block_mask_from_keep` from its lists, made elsewhere:
    ``lists`` (full_num, full_idx, part_num, part_idx) as
    :func:`attnlab.kernels.budget.budget_select` returns them (no full lists under a
    ``mask_mod``)."""
    full_num, full_idx, part_num, part_idx = lists
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=causal_mask if mask_mod is None else mask_mod,
        seq_lengths=(n, n),
        compute_q_blocks=False,
    )


def tiled_block_mask(keep: torch.Tensor, block_size: int, tile: tuple[int, int], mask_mod=None):
    """The token pairs of :func:`block_mask_from_keep` in coarser BlockMask blocks of
    ``tile`` (query x key tokens, multiples of ``block_size``): a tile is listed where it
    holds a kept block, and its ``mask_mod`` looks each pair's block up in ``keep``, so
    the kernel runs its own tile over exactly the selection's pairs. A tile whose blocks
    are all kept and wholly below the diagonal (no model mask) is full. keep: (B, H, M, M)
    bool. Returns the BlockMask and the tokens it covers (a multiple of the tile)."""
    tq, tk = tile
    b, h, m, _ = keep.shape
    span = max(tq, tk)
    n = -(-m * block_size // span) * span
    mb, mq, mk = n // block_size, n // tq, n // tk
    padded = keep.contiguous()  # (B, H, n / block, n / block): every looked-up pair in range
    if mb > m:
        padded = keep.new_zeros(b, h, mb, mb)
        padded[..., :m, :m] = keep
    tiles = padded.view(b, h, mq, tq // block_size, mk, tk // block_size)
    held = tiles.any(5).any(3)  # (B, H, n / tq, n / tk)
    inner = causal_mask if mask_mod is None else mask_mod

    def pair_kept(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx, kv_idx) & padded[b, h, q_idx // block_size, kv_idx // block_size]

    full_num = full_idx = None
    if mask_mod is None:
        q0 = torch.arange(mq, device=keep.device)[:, None] * tq
        below = torch.arange(1, mk + 1, device=keep.device)[None, :] * tk <= q0
        full = tiles.all(5).all(3) & below
        held &= ~full
        full_num, full_idx = listed(full)
    part_num, part_idx = listed(held)
    block_mask = BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=tile,
        mask_mod=pair_kept,
        seq_lengths=(n, n),
        compute_q_blocks=False,
    )
    return block_mask, n


def _pad_tokens(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, n_pad)) if n_pad else x


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_keep: torch.Tensor,
    block_size: int,
    scaling: float,
    mask_mod=None,
    lists=None,
    tile: tuple[int, int] | None = None,
    whole=None,
) -> torch.Tensor:
    """Causal attention restricted to the kept blocks, through FlexAttention.

    q: (B, H, N, D); k, v: (B, Hkv, N, D), H a multiple of Hkv (GQA); block_keep: (B or 1,
    H or 1, M, M) bool, M = ceil(N / block_size). Query t attends key s when s <= t and
    block_keep[b, h, t // block_size, s // block_size]; equal to a masked softmax over
    those pairs, and, with a ``mask_mod`` (the model's own mask), only the pairs it
    allows. A query row with nothing kept gets zeros. Returns (B, H, N, D). Forward only
    (the BlockMask has no transposed lists). ``lists``: (full_num, full_idx, part_num,
    part_idx) of ``block_keep`` as :func:`block_mask_from_keep` would make them, where
    the caller has them (:func:`attnlab.kernels.budget.budget_select`). ``tile``:
    (query, key) tokens, multiples of ``block_size``, in which the kernel runs the same
    pairs (:func:`tiled_block_mask`; the lists are not read); None, or a tile not made of
    whole blocks: tiles of the block. ``whole``: (r, k0, the model's own mask as a
    BlockMask of its rows from r over its keys from k0), with its ``mask_mod``, where the
    caller knows that every row from r keeps every key that mask shows it (a multiple of
    the block; ``windows.whole_rows``): those rows run as that mask, in its tiles, the
    rows before r in tiles of the block; ``block_keep``'s rows from r are not read, and
    the output lies over a (B, N, H, D) tensor, as the model reads it next.
    """
    b, h, n, _ = q.shape
    m = block_keep.shape[-1]
    if m * block_size < n or (m - 1) * block_size >= n:
        raise ValueError(f"block_keep has {m} blocks, N = {n} needs {n_blocks(n, block_size)}")
    keep = block_keep.to(device=q.device, dtype=torch.bool).expand(b, h, m, m)
    in_tiles = tile is not None and all(t % block_size == 0 for t in tile)
    if in_tiles and max(tile) > block_size:
        block_mask, padded = tiled_block_mask(keep, block_size, tile, mask_mod)
        options = kernel_options(*tile, q.shape[-1])
    else:
        padded, options = m * block_size, kernel_options(block_size, block_size, q.shape[-1])
        if whole is not None and mask_mod is not None:
            return _whole_rows_apart(q, k, v, keep, block_size, scaling, mask_mod, lists, whole)
        if lists is None:
            block_mask = block_mask_from_keep(keep, block_size, padded, mask_mod)
        else:
            block_mask = block_mask_from_lists(lists, block_size, padded, mask_mod)
    q, k, v = (_pad_tokens(x, padded - n) for x in (q, k, v))
    return run_flex(q, k, v, block_mask, scaling, options)[:, :, :n]


def _whole_rows_apart(q, k, v, keep, block_size, scaling, mask_mod, lists, whole):
    """``flex_block_sparse_attention`` under the model's mask with ``whole``: the rows from
    r as the model's own mask over the keys from k0, the rows before r in tiles of the
    block under their lists (sliced: no list, no program for the rows after r), each
    output copied into its rows of one (B, N, H, D) tensor (the model's next layout: the
    copy it would make of one stacked output)."""
    r, k0, rows = whole
    if r % block_size:
        raise ValueError(f"whole rows from {r}: not a multiple of the block {block_size}")
    b, h, n, d = q.shape
    out = q.new_empty(b, n, h, d).transpose(1, 2)  # (B, H, N, D) over (B, N, H, D)
    dense = dense_options(d)
    out[:, :, r:] = run_flex(q[:, :, r:], k[:, :, k0:], v[:, :, k0:], rows, scaling, dense)
    if r == 0:
        return out
    m = r // block_size
    if lists is None:
        lists = keep_lists(keep[..., :m, :m], all_partial=True)
    else:  # a row's kept blocks, its first ``num`` entries, lie before its own block's end
        lists = [x if x is None else x[..., :m, :m] if x.dim() == 4 else x[..., :m] for x in lists]
    head = block_mask_from_lists(lists, block_size, r, mask_mod)
    options = kernel_options(block_size, block_size, d)
    out[:, :, :r] = run_flex(q[:, :, :r], k[:, :, :r], v[:, :, :r], head, scaling, options)
    return out


def block_mask_from_selection(selection, kv_block: int, n: int) -> BlockMask:
    """BlockMask of a ``kernels.BlockSelection``: query blocks of q_group * kv_block tokens."""
    q_block = selection.q_group * kv_block
    return BlockMask.from_kv_blocks(
        selection.partial_num,
        selection.partial_idx,
        selection.full_num,
        selection.full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=causal_mask,
        seq_lengths=(n, n),
        compute_q_blocks=False,
    )


def flex_attention_from_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection,
    kv_block: int,
    scaling: float,
) -> torch.Tensor:
    """Causal attention over the blocks of a ``kernels.BlockSelection`` (from ``cab_select``).

    Every query of a query block (q_group * kv_block tokens) attends the causal part of
    that block's selected key blocks. N must be a multiple of the query block. Returns
    (B, H, N, D).
    """
    q_block = selection.q_group * kv_block
    n = q.shape[2]
    if n % q_block:
        raise ValueError(f"N = {n} is not a multiple of the query block {q_block}")
    block_mask = block_mask_from_selection(selection, kv_block, n)
    return run_flex(q, k, v, block_mask, scaling, kernel_options(q_block, kv_block, q.shape[-1]))
