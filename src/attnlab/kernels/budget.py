"""Triton kernel: a block policy's budgeted selection and its FlexAttention lists, fused.

The selection every block policy's prefill makes (:func:`attnlab.policies.selection.
keep_blocks_by_budget`): per query block, key blocks in descending score order (ties to
the earlier block, as a stable sort) while their visible keys fit the row's budget; the
best visible block always, every +inf (must-keep) block whatever the budget, no block the
row does not see. In PyTorch that is a sort of every row, gathers, a prefix sum and a
scatter, then two more sorts for the BlockMask's lists (:func:`attnlab.flex.
block_mask_from_keep`), each a pass over a (B, H, Mq, Mk) grid: at 32k tokens and
16-token blocks a 2048 x 2048 grid per head, a dozen kernels per layer.

Here one program owns one query block's row, in registers, and sorts nothing: the prefix
of the sorted row that fits is every block whose score (as an order-preserving integer)
lies above a threshold, then the blocks at the threshold, earliest first, while they fit.
The threshold is found by a binary search over the 2^32 integer orders (33 halvings, each
a masked sum over the row: fewer steps than a bitonic sort's 66 at 2048 blocks, each one
reduction where a sort's stages exchange the row's elements), the ties by a prefix sum.
(Ranking each block of a window's band among the row's others in one reduction, every
pair compared at once, made the same prefix slower than the search on an H100:
benchmarks_ref/budget_rank_h100.txt.) The program writes the
keep-mask in column order and the lists from running counts: kept blocks ascending
(strictly left of the diagonal "full", the diagonal "partial"; every kept block partial
under the model's own mask), then the others ascending, exactly as
``flex.ordered_blocks`` orders them.

A row searches only its band: the key blocks from its first to its last with a visible key
(every other block can never be kept). :func:`row_bands` finds the bands once per forward
pass and groups the rows into launches by their band's width, rounded up to a power of
two: under a sliding window a query block's band is 33 of 2048 blocks (32k tokens, a
512-token window, 16-token blocks), and a causal row's band ends at its own block, so
half the rows search half the grid's width or less. The same selection, the same kept blocks
listed first (the blocks after them in the lists, which FlexAttention never reads, are
the band's others only).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 8192  # key blocks a row may have (128k tokens in blocks of 16): one program
# holds its row in registers


@triton.jit
def _budget_kernel(
    score_ptr, count_ptr, budget_ptr, lo_ptr, keep_ptr,
    full_num_ptr, full_idx_ptr, part_num_ptr, part_idx_ptr, pairs_ptr, kept_ptr,
    M, W, R0, H, s_sc_b, s_sc_h, s_sc_m, s_ct_b, s_ct_m, s_bu_b, s_bu_h, s_lo_b, s_pr_m,
    BLOCK: tl.constexpr, ALL_PARTIAL: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    i = R0 + tl.program_id(0)  # the query block
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    b = bh // H
    h = bh % H
    lo = tl.load(lo_ptr + b * s_lo_b + i)  # the row's band: key blocks lo .. lo + W - 1
    band = tl.arange(0, BLOCK)
    cols = lo + band
    in_m = (band < W) & (cols < M)
    s = tl.load(score_ptr + b * s_sc_b + h * s_sc_h + i * s_sc_m + cols, mask=in_m, other=0.0)
    c = tl.load(count_ptr + b * s_ct_b + i * s_ct_m + cols, mask=in_m, other=0)
    budget = tl.load(budget_ptr + b * s_bu_b + h * s_bu_h + i)
    s = tl.where(c == 0, float("-inf"), s.to(tl.float32) + 0.0)  # + 0.0: -0.0 is +0.0
    s = tl.where(in_m, s, float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    o = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order: the float's
    # The sorted row's prefix that fits is every block above a threshold order t, then the
    # blocks at t, earliest first, while they fit: t is the largest order whose blocks at
    # or above it exceed the budget (a binary search over the 2^32 orders, 33 halvings of
    # a sum over the row), none where the whole row fits (t below every order).
    o64 = o.to(tl.int64)
    zero = budget.to(tl.int64) * 0  # an int64 scalar, whatever the budget's type
    lo_t = zero - 2**31 - 1  # its blocks and above exceed the budget
    hi_t = zero + 2**31  # its blocks and above fit (none)
    for _ in range(33):  # 2^32 + 1 orders between them, halved 33 times: adjacent
        mid = (lo_t + hi_t) >> 1
        over = tl.sum(tl.where(o64 >= mid, c, 0), axis=0) > budget
        go = hi_t - lo_t > 1
        lo_t = tl.where(go & over, mid, lo_t)
        hi_t = tl.where(go & ~over, mid, hi_t)
    above = o64 > lo_t
    tie = o64 == lo_t
    used = tl.sum(tl.where(above, c, 0), axis=0)
    fits = above | (tie & (used + tl.cumsum(tl.where(tie, c, 0), axis=0) <= budget))
    best = tl.max(o, axis=0)  # the row's first in order: the best, the earliest of equals
    first = (o == best) & (band == tl.min(tl.where(o == best, band, BLOCK), axis=0))
    ninf = tl.full((1,), float("-inf"), tl.float32).to(tl.int32, bitcast=True) ^ 0x7FFFFFFF
    top = o == 0x7F800000  # +inf (positive: its bits are its order)
    kept = (fits | first | top) & (o != ninf) & in_m  # not -inf
    lists = bh * M + i  # this row's lists
    tl.store(keep_ptr + lists * M + cols, kept.to(tl.int8), mask=in_m)
    if PAIRS:  # the row's kept pairs (pairs: visible pairs per block pair, every row's)
        p = tl.load(pairs_ptr + i * s_pr_m + cols, mask=in_m, other=0).to(tl.int64)
        tl.store(kept_ptr + lists, tl.sum(tl.where(kept, p, 0), axis=0))
    if ALL_PARTIAL:  # every kept block at or left of the diagonal, pair by pair
        _write_list(kept & (cols <= i), cols, in_m, part_idx_ptr + lists * M, part_num_ptr + lists)
    else:
        _write_list(kept & (cols < i), cols, in_m, full_idx_ptr + lists * M, full_num_ptr + lists)
        _write_list(kept & (cols == i), cols, in_m, part_idx_ptr + lists * M, part_num_ptr + lists)


@triton.jit
def _write_list(sel, cols, in_m, idx_ptr, num_ptr):
    # the selected blocks ascending, then the others ascending (flex.ordered_blocks)
    sel = sel & in_m
    num = tl.sum(sel.to(tl.int32), axis=0)
    before = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    others = tl.cumsum((~sel & in_m).to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + tl.where(sel, before, num + others), cols, mask=in_m)
    tl.store(num_ptr, num)


def row_bands(count: torch.Tensor, max_launches: int = 12) -> tuple[torch.Tensor, list]:
    """Each query block's band of key blocks, from its first to its last with a visible
    key: count (B or 1, 1, Mq, Mk) -> the first (B or 1, Mq) int32, and the launches of
    :func:`budget_select`: (first row, end row, band width) over runs of rows whose widths
    round up to the same power of two (at least 16), or one launch of the widest band
    where the runs would make more than ``max_launches``. One wait for the device, once
    per forward pass and mask (the caller keeps it)."""
    seen = count[:, 0] > 0  # (B, Mq, Mk)
    m = seen.shape[-1]
    cols = torch.arange(m, device=count.device)
    lo = torch.where(seen, cols, m).amin(-1)
    hi = torch.where(seen, cols, -1).amax(-1)
    widths = (hi - lo + 1).clamp(min=1).amax(0).tolist()  # (Mq,) over the batch
    return lo.clamp(max=m - 1).to(torch.int32), _launches(widths, max_launches)


def causal_bands(m: int, device, max_launches: int = 12) -> tuple[torch.Tensor, list]:
    """:func:`row_bands` of a causal grid of ``m`` query blocks (block i sees key blocks 0
    to i), made on the host: no wait for the device."""
    first = torch.zeros(1, m, dtype=torch.int32, device=device)
    return first, list(_causal_launches(m, max_launches))


def window_bands(t: int, block_size: int, w: int, device, max_launches: int = 12):
    """:func:`row_bands` of a prefill of ``t`` tokens under a sliding window of ``w`` keys
    (query block i's rows see from key block (i bs - w + 1) / bs to block i), made on the
    host: no wait for the device (the first blocks made there, not copied to it)."""
    starts = torch.arange(0, t, block_size, device=device)
    first = ((starts - w + 1).clamp(min=0) // block_size).to(torch.int32)[None]
    return first, list(_window_launches(t, block_size, w, max_launches))


@functools.cache
def _window_launches(t: int, block_size: int, w: int, max_launches: int):
    starts = range(0, t, block_size)
    first = [max(0, s - w + 1) // block_size for s in starts]
    last = [(min(s + block_size, t) - 1) // block_size for s in starts]
    return tuple(_launches([hi - lo + 1 for lo, hi in zip(first, last, strict=True)], max_launches))


@functools.cache
def _causal_launches(m: int, max_launches: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(_launches(list(range(1, m + 1)), max_launches))


def _launches(widths: list[int], max_launches: int) -> list[tuple[int, int, int]]:
    # one pass over the rows in plain integers (a 32k prefill's 2048 rows: well under a
    # millisecond; triton.next_power_of_2 is a constexpr function, microseconds a call)
    launches, r0 = [], 0
    for _, run in itertools.groupby(widths, _row_size):
        run = list(run)
        launches.append((r0, r0 + len(run), max(run)))
        r0 += len(run)
    if len(launches) > max_launches:
        launches = [(0, len(widths), max(widths))]
    return launches


def _warps(size: int) -> int:
    """Warps of a program holding a row of ``size`` blocks: about 8 blocks a thread, so a
    window's band (64 or fewer) sums within one warp, with no barrier between warps in
    each of the search's 33 sums."""
    return max(1, min(8, size // 256))


def launch_shape(width: int) -> tuple[int, int]:
    """The row a program holds and its warps, for a band of ``width`` blocks (the compile
    check builds the same)."""
    size = _row_size(width)
    return size, _warps(size)


def _row_size(width: int) -> int:
    """The row length a program holds for a band of ``width`` blocks (a power of two)."""
    return max(16, 1 << (int(width) - 1).bit_length())


def budget_select(
    score: torch.Tensor,
    count: torch.Tensor,
    budget: torch.Tensor,
    all_partial: bool,
    bands: tuple[torch.Tensor, list] | None = None,
    pairs: torch.Tensor | None = None,
    rows: int | None = None,
) -> tuple:
    """The selection of ``keep_blocks_by_budget`` and the BlockMask lists of
    ``block_mask_from_keep`` (query blocks as tall as key blocks), in one kernel.

    score: (B, H, Mq, Mk) with +inf for must-keep blocks, Mq = Mk; count: (B or 1, 1, Mq,
    Mk) visible keys per block (< 2^16); budget: (B or 1, 1 or H, Mq) keys per query block.
    ``all_partial``: the model's own mask applies pair by pair (a window), so every kept
    block at or left of the diagonal is partial; else blocks strictly left of it are full.
    ``bands``: :func:`row_bands` of ``count`` (found here when None), each row searching
    its band alone. ``pairs``: (Mq, Mk) visible token pairs per block pair, the same for
    every batch row and head: the kept ones are summed in the same pass.
    Returns the keep-mask (B, H, Mq, Mk) bool and (full_num, full_idx, part_num, part_idx),
    each list of kept blocks ascending, then the band's others ascending (full_num None
    under ``all_partial``); with ``pairs`` also the kept pairs, a 0-dim int64 tensor on the
    device (no wait: the accounting of :meth:`attnlab.sparse.SparseRun.flex_attention`).
    ``rows``: only the first ``rows`` query blocks are selected (the keep-mask's later
    rows stay False, their lists and kept pairs are neither written nor summed); None:
    every one. A list's entries after its band are not written (FlexAttention reads a
    row's first ``num``).
    """
    b, h, m, mk = score.shape
    if m != mk or mk > MAX_BLOCKS:
        raise ValueError(
            f"budget_select needs square grids of at most {MAX_BLOCKS} blocks, got {m} x {mk}"
        )
    dev = score.device
    lo, launches = row_bands(count) if bands is None else bands
    # no copies where the inputs are already the kernel's (a broadcast batch or head is a
    # stride of 0): each layer's selection reads its pass's counts, bands and budgets as made
    score = _rows_contiguous(score.float())
    count = _rows_contiguous(count.to(torch.int32)).expand(b, 1, m, mk)
    budget = _rows_contiguous(budget.to(torch.int64)).expand(b, h, m)
    lo = _rows_contiguous(lo.to(device=dev, dtype=torch.int32)).expand(b, m)
    keep = torch.zeros(b, h, m, mk, dtype=torch.int8, device=dev)
    lists = 1 if all_partial else 2  # no full lists under the model's own mask
    nums = [torch.empty(b, h, m, dtype=torch.int32, device=dev) for _ in range(lists)]
    # each row writes its band's blocks, the rest of a list is never read: not cleared
    idxs = [torch.empty(b, h, m, mk, dtype=torch.int32, device=dev) for _ in range(lists)]
    counts_pairs = pairs is not None  # every row chosen writes its own
    rows_kept = torch.empty(b, h, m, dtype=torch.int64, device=dev) if counts_pairs else nums[-1]
    pairs = _rows_contiguous(pairs) if counts_pairs else count  # else never read
    rows = m if rows is None else max(0, min(rows, m))
    for r0, r1, width in launches:
        r1 = min(r1, rows)
        if r1 <= r0:
            continue
        size, warps = launch_shape(width)
        _budget_kernel[(r1 - r0, b * h)](
            score, count, budget, lo, keep, nums[0], idxs[0], nums[-1], idxs[-1], pairs,
            rows_kept, mk, width, r0, h, *score.stride()[:3], count.stride(0), count.stride(2),
            *budget.stride()[:2], lo.stride(0), pairs.stride(-2),
            BLOCK=size, ALL_PARTIAL=all_partial, PAIRS=counts_pairs, num_warps=warps,
        )  # fmt: skip
    full = (None, None) if all_partial else (nums[0], idxs[0])
    out = keep.view(torch.bool), (*full, nums[-1], idxs[-1])
    return (*out, rows_kept[..., :rows].sum()) if counts_pairs else out


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself where its last dimension is contiguous (the kernel's rows), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
