"""Triton kernel: CAB block scores and per-query-block top-k selection, fused.

One program owns one query row of blocks (or a group of G consecutive rows, pooled by
max), holds the whole row of M key blocks in registers and does everything from there:
z-scores of -F and A over the causal entries, the blend, must-keep blocks, the top-k, and
the outputs. The top-k is exact and stable (ties go to the earlier key block, as in
``torch.argsort(stable=True)``): a bisection over the order-preserving integer image of
the float scores finds a threshold with exactly k scores above it (at most 32 counting
passes, about a dozen for distinct scores), and a prefix sum ranks any ties. The
selection comes out as a dense bool mask, as FlexAttention's block lists (full blocks
left of the query block, partial ones reaching its diagonal), or both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_KEY_QUARTER = tl.constexpr(0x3E800000)  # bits of 0.25
_KEY_SIXTEEN = tl.constexpr(0x41800000)  # bits of 16.0


@triton.jit
def _zscore(x, causal, cnt):
    # per row of a (rows, M) tile, over its causal entries
    mean = tl.sum(tl.where(causal, x, 0.0), axis=1) / cnt
    dev = tl.where(causal, x - mean[:, None], 0.0)
    std = tl.sqrt_rn(tl.sum(dev * dev, axis=1) / cnt)
    return tl.where(causal, (x - mean[:, None]) / tl.maximum(std, 1e-6)[:, None], 0.0)


@triton.jit
def _score_select_kernel(
    src_ptr, a_ptr, score_ptr, keep_ptr, must_ptr, mask_ptr,
    full_num_ptr, full_idx_ptr, part_num_ptr, part_idx_ptr,
    M, Mq, Mg, g_offset, lam,
    s_src_bh, s_src_m, s_a_bh, s_a_m, s_sc_bh, s_sc_m,
    s_must_g, s_mask_bh, s_mask_g, s_idx_bh, s_idx_g,
    G: tl.constexpr, G_POW2: tl.constexpr, BLOCK: tl.constexpr,
    FROM_SCORE: tl.constexpr, USE_F: tl.constexpr, USE_A: tl.constexpr,
    HAS_MUST: tl.constexpr, WRITE_SCORE: tl.constexpr,
    WRITE_MASK: tl.constexpr, WRITE_IDX: tl.constexpr, SELECT: tl.constexpr,
):  # fmt: skip
    g = g_offset + tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    cols = tl.arange(0, BLOCK)  # BLOCK covers the causal part of the row
    in_m = cols < M
    r = tl.arange(0, G_POW2)
    rows = g * G + r  # the score rows pooled into this query block
    row_ok = (r < G) & (rows < Mq)
    tile_ok = row_ok[:, None] & in_m[None, :]  # (G_POW2, BLOCK)
    if FROM_SCORE:
        ptrs = src_ptr + bh * s_src_bh + rows[:, None] * s_src_m + cols[None, :]
        s = tl.load(ptrs, mask=tile_ok, other=float("-inf")).to(tl.float32)
    else:
        causal = tile_ok & (cols[None, :] <= rows[:, None])
        cnt = (rows + 1).to(tl.float32)
        s = tl.zeros((G_POW2, BLOCK), tl.float32)
        if USE_A:
            a_ptrs = a_ptr + bh * s_a_bh + rows[:, None] * s_a_m + cols[None, :]
            a = tl.load(a_ptrs, mask=causal, other=0.0).to(tl.float32)
            s = (1.0 - lam) * _zscore(a, causal, cnt)
        if USE_F:
            f_ptrs = src_ptr + bh * s_src_bh + rows[:, None] * s_src_m + cols[None, :]
            neg_f = -tl.load(f_ptrs, mask=causal, other=0.0)
            s = s + lam * _zscore(neg_f, causal, cnt)
        s = tl.where(causal, s, float("-inf"))
        if WRITE_SCORE:
            sc_ptrs = score_ptr + bh * s_sc_bh + rows[:, None] * s_sc_m + cols[None, :]
            tl.store(sc_ptrs, s, mask=tile_ok)
    if SELECT:  # not when only the scores are asked for
        pooled = tl.max(s, axis=0) + 0.0  # (BLOCK,); + 0.0 turns -0.0 into +0.0

        n_causal = tl.minimum(M, g * G + G)
        k = tl.minimum(tl.load(keep_ptr + g), n_causal)
        if HAS_MUST:
            must = tl.load(must_ptr + g * s_must_g + cols, mask=in_m, other=0) != 0
            if not FROM_SCORE:
                must = must & (cols < n_causal)
            pooled = tl.where(must, float("inf"), pooled)
        pooled = tl.where(in_m, pooled, float("-inf"))

        # bisection for a threshold with exactly k keys at or above it; it stops early once
        # one falls between the k-th and (k+1)-th largest score and otherwise converges on
        # the k-th largest itself (ties)
        bits = pooled.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order == float order
        lo = tl.min(key, axis=0).to(tl.int64)  # count(key >= lo) >= k throughout
        hi = tl.max(key, axis=0).to(tl.int64)  # the k-th largest key is <= hi throughout
        count_lo = k * 0 + BLOCK
        # z-scores: the k-th largest mostly lies in [0.25, 16), 2^25 keys instead of 2^32,
        # which halves the steps; two counts check whether it does
        count_quarter = tl.sum((key >= _KEY_QUARTER).to(tl.int32), axis=0)
        from_quarter = (count_quarter >= k) & (k > 0)
        lo = tl.where(from_quarter, lo * 0 + _KEY_QUARTER, lo)
        count_lo = tl.where(from_quarter, count_quarter, count_lo)
        below_16 = tl.sum((key >= _KEY_SIXTEEN).to(tl.int32), axis=0) < k
        hi = tl.where(below_16, hi * 0 + (_KEY_SIXTEEN - 1), hi)
        while (lo < hi) & (count_lo != k):
            mid = lo + (hi - lo + 1) // 2
            count = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
            ok = count >= k
            lo = tl.where(ok, mid, lo)
            count_lo = tl.where(ok, count, count_lo)
            hi = tl.where(ok, hi, mid - 1)
        kth = lo.to(tl.int32)
        above = key > kth
        tied = key == kth
        need = k - tl.sum(above.to(tl.int32), axis=0)
        sel = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
        sel = sel & (pooled > float("-inf"))
        if HAS_MUST:
            sel = sel | must
        sel = sel & in_m

        if WRITE_MASK:
            tl.store(mask_ptr + bh * s_mask_bh + g * s_mask_g + cols, sel.to(tl.int8), mask=in_m)
        if WRITE_IDX:
            # kept blocks left of the query block are whole for all its queries, the rest
            # reach the diagonal; one prefix sum places both lists in ascending order
            first = g * G
            is_full = cols < first
            pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
            n_full = tl.sum((sel & is_full).to(tl.int32), axis=0)
            row_off = bh * s_idx_bh + g * s_idx_g
            tl.store(full_idx_ptr + row_off + pos, cols, mask=sel & is_full)
            tl.store(part_idx_ptr + row_off + pos - n_full, cols, mask=sel & ~is_full)
            tl.store(full_num_ptr + bh * Mg + g, n_full)
            tl.store(part_num_ptr + bh * Mg + g, tl.sum(sel.to(tl.int32), axis=0) - n_full)


@dataclass
class BlockSelection:
    """A block selection, as FlexAttention's lists and optionally as a dense mask.

    Query blocks are ``q_group`` key blocks tall. ``full_num``/``full_idx`` (B, H, Mg) and
    (B, H, Mg, M) list, first ``full_num`` entries valid and ascending, the kept key blocks
    that every query of the block sees whole; ``partial_num``/``partial_idx`` the kept
    ones that reach the diagonal and need the causal mask. ``mask``: (B, H, Mg, M) bool or
    None; ``score``: (B, H, M, M) float32 CAB scores or None.
    """

    full_num: torch.Tensor | None
    full_idx: torch.Tensor | None
    partial_num: torch.Tensor | None
    partial_idx: torch.Tensor | None
    mask: torch.Tensor | None
    score: torch.Tensor | None
    q_group: int


def score_and_select(
    src: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    a: torch.Tensor | None = None,
    lam: float = 1.0,
    from_score: bool = False,
    must_keep: torch.Tensor | None = None,
    q_group: int = 1,
    write_score: bool = False,
    write_mask: bool = True,
    write_indices: bool = False,
    num_warps: int = 4,
    band_floor: int = 128,
) -> BlockSelection:
    """Run the fused score and top-k kernel on (B, H, M, M) rows, or on the first Mq rows
    of a score alone: ``src`` (and ``a``) (B, H, Mq, M), Mq <= M, where only the scores
    are written (the score's later rows stay -inf).

    With ``from_score=True``, ``src`` is a ready score (-inf where not allowed) and is
    selected as it is. Otherwise ``src`` is the curvature F (read on and below the
    diagonal only) and ``a`` the adjacency, needed when lam < 1; the kernel forms
    lam * z(-F) + (1 - lam) * z(A) per row as ``reference.cab_block_scores`` does.
    keep: (Mg,) key blocks per query group, Mg = ceil(M / q_group), or None where only the
    scores are written (``write_score`` alone: no selection is made); must_keep: (Mg, M)
    bool, kept whatever their score and counted toward keep (from F, only its causal
    entries count: a later key block cannot be attended). Groups of q_group rows are
    pooled by the max of their scores before the top-k. Launches are banded by row
    length, so that a query block near the start holds a short row, not all M columns.
    """
    b, h, mq, m = src.shape
    mg = triton.cdiv(m, q_group)
    dev = src.device
    if mq > m:
        raise ValueError(f"src has {mq} rows of {m} blocks: at most {m}")
    if mq < m and (write_mask or write_indices or from_score or q_group != 1):
        raise ValueError(f"{mq} of {m} rows: only a score from F or A may leave rows out")
    use_f = not from_score and lam != 0.0
    use_a = not from_score and lam != 1.0
    if use_a and a is None:
        raise ValueError("lam < 1 needs the adjacency a")
    if use_a and a.shape != src.shape:
        raise ValueError(f"a {tuple(a.shape)} must have src's shape {tuple(src.shape)}")
    select = write_mask or write_indices
    if not select and not write_score:
        raise ValueError("nothing to write: ask for the score, the mask or the lists")
    if keep is None:
        if select:
            raise ValueError("a selection needs keep")
        keep = torch.zeros(mg, dtype=torch.int32, device=dev)
    keep = keep.to(device=dev, dtype=torch.int32).contiguous()
    if keep.shape != (mg,):
        raise ValueError(f"keep must have shape ({mg},), got {tuple(keep.shape)}")
    must = None
    if must_keep is not None:
        must = must_keep.to(device=dev, dtype=torch.uint8).contiguous()  # (Mg, M)
    score = mask = None  # the kernel writes only each row's causal columns of these two
    if write_score:
        score = torch.full((b, h, m, m), float("-inf"), dtype=torch.float32, device=dev)
    if write_mask:
        mask = torch.zeros(b, h, mg, m, dtype=torch.int8, device=dev)
    if write_indices:
        full_num = torch.empty(b, h, mg, dtype=torch.int32, device=dev)
        part_num = torch.empty(b, h, mg, dtype=torch.int32, device=dev)
        full_idx = torch.empty(b, h, mg, m, dtype=torch.int32, device=dev)
        part_idx = torch.empty(b, h, mg, m, dtype=torch.int32, device=dev)
    else:
        full_num = part_num = full_idx = part_idx = None
    src = src.contiguous()
    dummy = src
    a_arg = a.contiguous() if use_a else dummy
    for g0, g1, block in _bands(m, mg, q_group, from_score, band_floor):
        if (g1 := min(g1, mq)) <= g0:  # q_group 1 where rows are left out
            continue
        _score_select_kernel[(g1 - g0, b * h)](
            src, a_arg, score if score is not None else dummy, keep,
            must if must is not None else keep, mask if mask is not None else dummy,
            full_num if write_indices else keep, full_idx if write_indices else keep,
            part_num if write_indices else keep, part_idx if write_indices else keep,
            m, mq, mg, g0, float(lam),
            mq * m, m, mq * m, m, m * m, m,
            m, mg * m, m, mg * m, m,
            G=q_group, G_POW2=triton.next_power_of_2(q_group), BLOCK=block,
            FROM_SCORE=from_score, USE_F=use_f, USE_A=use_a,
            HAS_MUST=must is not None, WRITE_SCORE=write_score,
            WRITE_MASK=write_mask, WRITE_IDX=write_indices, SELECT=select,
            num_warps=max(1, min(num_warps, block // 256)),
        )  # fmt: skip
    return BlockSelection(
        full_num,
        full_idx,
        part_num,
        part_idx,
        mask.view(torch.bool) if mask is not None else None,
        score,
        q_group,
    )


@functools.cache
def _bands(
    m: int, mg: int, q_group: int, full_rows: bool, floor: int
) -> tuple[tuple[int, int, int], ...]:
    """(first group, end group, row width) launches: each group's causal columns fit."""
    if full_rows:
        return ((0, mg, triton.next_power_of_2(m)),)
    bands = []
    for g in range(mg):
        causal = min(m, (g + 1) * q_group)
        width = max(min(floor, triton.next_power_of_2(m)), triton.next_power_of_2(causal))
        if bands and bands[-1][2] == width:
            bands[-1] = (bands[-1][0], g + 1, width)
        else:
            bands.append((g, g + 1, width))
    return tuple(bands)


def top_blocks(
    score: torch.Tensor, keep: torch.Tensor, must_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of ``reference.top_blocks``: (B, H, M, M) bool block mask."""
    return score_and_select(score.float(), keep, from_score=True, must_keep=must_keep).mask


def top_blocks_grouped(
    score: torch.Tensor,
    keep: torch.Tensor,
    q_group: int,
    must_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.top_blocks_grouped``: (B, H, Mg, M) bool mask."""
    return score_and_select(
        score.float(), keep, from_score=True, must_keep=must_keep, q_group=q_group
    ).mask
