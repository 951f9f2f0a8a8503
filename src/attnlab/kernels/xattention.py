"""Triton kernel: XAttention's antidiagonal estimate, summed into key blocks per row.

One program takes scored rows of a whole prefill (``G``, :func:`launch_tiles`) and the
strided queries each sums (a range of at most block_size / stride, see
``XAttention.shares``), and sweeps one split of their causal strided keys (``SPLIT_KEYS``
of them; the later rows of a causal layer have several) once, flash-attention style:
each strided query's softmax maximum and sum run over every causal strided key (as the
estimate is defined), and from the key tile of the first key block the row can keep on (a
sliding window's edge: the blocks before it are left 0) each tile's exponentials, taken
against the split's running maximum, are summed into key blocks per strided query and set
aside with that maximum; each split keeps its maximum and sum per query. A second kernel
joins the splits (each query's maximum and sum over all of them), rescales the sums to
them and adds them over the row's queries: no second sweep recomputes the products once
the maxima are known (a causal layer's products twice), at the cost of a float set aside
per strided query and key block (16 MiB at 32k tokens, 4 heads, stride 8, 128-token
blocks). The (T / S) x (T / S) estimate and its softmax are never written.

:func:`threshold_scores` then turns a row's sums into ``XAttention.score``'s scores in one
program: the shares among the blocks the row sees, and each block's share of the blocks
ranked above it, every pair of the row compared at once (no sort, prefix sum or scatter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.adjacency import _mm

# strided keys one program of the estimate sweeps: a causal layer's later rows' sweeps
# split among programs, so that they take no longer than the earlier rows' (at 32k and
# stride 8, 4096 strided keys: up to 8 splits). At Gemma-3-270M's 32k shapes on one H100
# (benchmarks_ref/xattention_splits_h100.txt, profiler kernel time) a global layer's
# estimate took 0.77 ms in one sweep a program, 0.44 in splits of 512 keys (0.42-0.43 in
# 128-256, 0.48 in 1024, 0.61 in 2048), a window layer's 0.73 and 0.41
SPLIT_KEYS = 512
# key blocks a row of the fused threshold ranks at once (64k tokens in blocks of 128); a
# longer row's shares are ranked by PyTorch's sort
THRESHOLD_BLOCKS = 512


@triton.jit
def _estimate(
    q_base, k_base, ii, jj, row_ok, T, Tk, D, sq_n, sq_d, sk_n, sk_d, scaling,
    S: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # antidiagonal sums of the stride x stride tiles: strided query i's token i*S + S-1-s
    # with strided key j's token j*S + s, as in ``antidiagonal_scores``, then scaled as
    # ``XAttention.shares`` scales them (a mean over the antidiagonal); one product of
    # S * D terms, taken BD channels of one s at a time (DP: D rounded up to BD)
    dd = tl.arange(0, BD)
    acc = tl.zeros((BI, BN), tl.float32)
    for kk in range(0, S * DP, BD):
        s = kk // DP
        ch = kk - s * DP + dd
        qrow = ii * S + (S - 1 - s)
        qt = tl.load(
            q_base + qrow[:, None] * sq_n + ch[None, :] * sq_d,
            mask=(row_ok & (qrow < T))[:, None] & (ch < D)[None, :],
            other=0.0,
        )  # (BI, BD)
        krow = jj * S + s
        kt = tl.load(
            k_base + krow[None, :] * sk_n + ch[:, None] * sk_d,
            mask=(krow < Tk)[None, :] & (ch < D)[:, None],
            other=0.0,
        )  # (BD, BN)
        acc = _mm(qt, kt, acc, PRECISION)
    return acc * scaling / S


@triton.jit
def _rows(lo_ptr, hi_ptr, first_ptr, R, NK, MK, G: tl.constexpr, BI: tl.constexpr):
    # a program's rows, their strided queries (G * BI), the strided keys up to its last
    # query's own and the first key tile any of its rows sums
    rr = tl.program_id(0) * G + tl.arange(0, G)
    r_ok = rr < R
    lo = tl.load(lo_ptr + rr, mask=r_ok, other=0)
    hi = tl.load(hi_ptr + rr, mask=r_ok, other=0)
    t = tl.arange(0, BI)
    ii = tl.reshape(lo[:, None] + t[None, :], (G * BI,))  # the strided queries each row sums
    row_ok = tl.reshape(t[None, :] < (hi - lo)[:, None], (G * BI,))
    stop = tl.minimum(tl.max(hi, axis=0), NK)
    first = tl.min(tl.load(first_ptr + rr, mask=r_ok, other=MK), axis=0)
    return rr, r_ok, ii, row_ok, stop, first


@triton.jit
def _block_share_kernel(
    q_ptr, k_ptr, lo_ptr, hi_ptr, first_ptr, u_ptr, mt_ptr, ml_ptr,
    R, H, GROUPS, T, Tk, NK, MK, D, SPLIT, scaling,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, su_p, su_i, smt_p, smt_i, sml_p, sml_s,
    S: tl.constexpr, PER: tl.constexpr, G: tl.constexpr, BI: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # one split of a program's strided keys (SPLIT of them from split * SPLIT): each key
    # tile's exponentials, taken against the split's running maximum, summed into key
    # blocks per strided query and kept aside with that maximum; the split's maximum and
    # total per query at the end (:func:`_block_share_finish` joins the splits)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    b = bh // H
    h = bh % H
    rr, r_ok, ii, row_ok, stop, first = _rows(lo_ptr, hi_ptr, first_ptr, R, NK, MK, G, BI)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + (h // GROUPS) * sk_h
    j_first = (first * PER // BN) * BN  # the key tile of the rows' first key block
    loc = tl.arange(0, G * BI)
    at = bh * tl.num_programs(0) + pid
    u_base = u_ptr + at * su_p
    mt_base = mt_ptr + at * smt_p
    m_i = tl.full((G * BI,), float("-inf"), tl.float32)
    l_i = tl.zeros((G * BI,), tl.float32)
    for j0 in range(split * SPLIT, tl.minimum(stop, split * SPLIT + SPLIT), BN):
        jj = j0 + tl.arange(0, BN)
        est = _estimate(q_base, k_base, ii, jj, row_ok, T, Tk, D, sq_n, sq_d, sk_n, sk_d,
                        scaling, S, G * BI, BN, BD, DP, PRECISION)  # fmt: skip
        causal = (jj[None, :] <= ii[:, None]) & (jj < NK)[None, :]
        est = tl.where(causal, est, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(est, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(est - m_safe[:, None])
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(e, axis=1)
        m_i = m_new
        if j0 >= j_first:
            kb = j0 // PER + tl.arange(0, BN // PER)
            u = tl.sum(tl.reshape(e, (G * BI, BN // PER, PER)), axis=2)
            tl.store(u_base + loc[:, None] * su_i + kb[None, :], u)
            # the maximum itself: -inf where no key of the split so far is causal for the
            # query (u is 0 there), so that the join scales it by exp(-inf) = 0
            tl.store(mt_base + loc * smt_i + j0 // BN, m_new)
    ml_base = ml_ptr + at * sml_p + split * sml_s
    tl.store(ml_base + loc, m_i)
    tl.store(ml_base + G * BI + loc, l_i)


@triton.jit
def _block_share_finish(
    lo_ptr, hi_ptr, first_ptr, out_ptr, u_ptr, mt_ptr, ml_ptr, R, NK, MK, SPLITS,
    so_bh, so_r, su_p, su_i, smt_p, smt_i, sml_p, sml_s,
    PER: tl.constexpr, G: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # a program's splits joined (each query's maximum and total over every split), each
    # key tile's sums rescaled to them and added over the row's queries into key blocks
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rr, r_ok, ii, row_ok, stop, first = _rows(lo_ptr, hi_ptr, first_ptr, R, NK, MK, G, BI)
    j_first = (first * PER // BN) * BN
    loc = tl.arange(0, G * BI)
    at = bh * tl.num_programs(0) + pid
    u_base = u_ptr + at * su_p
    mt_base = mt_ptr + at * smt_p
    ml_base = ml_ptr + at * sml_p
    m_i = tl.full((G * BI,), float("-inf"), tl.float32)
    for split in range(0, SPLITS):
        m_i = tl.maximum(m_i, tl.load(ml_base + split * sml_s + loc))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros((G * BI,), tl.float32)
    for split in range(0, SPLITS):
        m_s = tl.load(ml_base + split * sml_s + loc)
        l_s = tl.load(ml_base + split * sml_s + G * BI + loc)
        l_i += tl.where(l_s > 0.0, l_s * tl.exp(m_s - m_safe), 0.0)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    for j0 in range(j_first, stop, BN):
        kb = j0 // PER + tl.arange(0, BN // PER)
        u = tl.load(u_base + loc[:, None] * su_i + kb[None, :])
        mt = tl.load(mt_base + loc * smt_i + j0 // BN)
        scale = tl.where(row_ok, tl.exp(mt - m_safe) / l_safe, 0.0)
        p = u * scale[:, None]
        blocks = tl.sum(tl.reshape(p, (G, BI, BN // PER)), axis=1)  # (G, BN / PER)
        ptrs = out_ptr + bh * so_bh + rr[:, None] * so_r + kb[None, :]
        tl.store(ptrs, blocks, mask=r_ok[:, None] & (kb < MK)[None, :])


@triton.jit
def _threshold_kernel(
    blocks_ptr, seen_ptr, must_ptr, thr_ptr, out_ptr, MK, H,
    sb_bh, sb_r, ss_b, ss_h, ss_r, ss_k, sm_r, so_bh, so_r,
    BLOCK: tl.constexpr, CH: tl.constexpr, THRESHOLD_ONLY: tl.constexpr,
):  # fmt: skip
    # one row: its shares (the block sums over their total, the unseen blocks' dropped,
    # over the seen ones' total), then per block the share of the blocks ranked above it
    # (the must-keep blocks' first; a higher share, or an equal one to its left), every
    # pair of the row compared at once, CH blocks at a time
    r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    row = blocks_ptr + bh * sb_bh + r * sb_r
    seen_row = seen_ptr + b * ss_b + h * ss_h + r * ss_r
    must_row = must_ptr + r * sm_r
    i = tl.arange(0, BLOCK)
    ok = i < MK
    raw = tl.load(row + i, mask=ok, other=0.0)
    total = tl.maximum(tl.sum(raw, axis=0), 1e-12)
    part = tl.where(tl.load(seen_row + i * ss_k, mask=ok, other=0) != 0, raw / total, 0.0)
    seen_total = tl.maximum(tl.sum(part, axis=0), 1e-12)
    share = part / seen_total
    must = tl.load(must_row + i, mask=ok, other=0) != 0
    first = tl.sum(tl.where(must, share, 0.0), axis=0)
    key = tl.where(must | ~ok, -1.0, share)  # the must-keep blocks rank last, share 0
    mass = tl.maximum(key, 0.0)
    thr = tl.load(thr_ptr + h)
    for c0 in range(0, BLOCK, CH):
        j = c0 + tl.arange(0, CH)
        ok_j = j < MK
        raw_j = tl.load(row + j, mask=ok_j, other=0.0)
        seen_j = tl.load(seen_row + j * ss_k, mask=ok_j, other=0) != 0
        share_j = tl.where(seen_j, raw_j / total, 0.0) / seen_total
        must_j = tl.load(must_row + j, mask=ok_j, other=0) != 0
        key_j = tl.where(must_j | ~ok_j, -1.0, share_j)
        above = (key[:, None] > key_j[None, :]) | (
            (key[:, None] == key_j[None, :]) & (i[:, None] < j[None, :])
        )
        before = first + tl.sum(tl.where(above, mass[:, None], 0.0), axis=0)
        if THRESHOLD_ONLY:
            score = tl.where(before < thr, float("inf"), float("-inf"))
        else:
            score = tl.where(before < thr, share_j, float("-inf"))
        score = tl.where(must_j, float("inf"), score)
        tl.store(out_ptr + bh * so_bh + r * so_r + j, score, mask=ok_j)


def threshold_scores(
    blocks: torch.Tensor,
    seen: torch.Tensor,
    must: torch.Tensor,
    thresholds: torch.Tensor | float,
    threshold_only: bool = False,
) -> torch.Tensor:
    """``XAttention.score``'s scores from :func:`block_shares`' sums, in one kernel: each
    row's shares among the blocks it sees, the must-keep blocks counted first, the others
    in decreasing share (ties to the earlier block) while the share before them stays
    under the threshold: those score their share (+inf with ``threshold_only``), the rest
    -inf, the must-keep blocks +inf. blocks: (B, H, R, Mk) float32; seen: (B or 1, H or
    1, R, Mk) bool; must: (R, Mk) bool; thresholds: a float or one per head ((H, 1, 1)).
    Rows of at most ``THRESHOLD_BLOCKS`` blocks. Returns (B, H, R, Mk) float32, equal to
    the PyTorch tail's up to float32 summation order."""
    b, h, rows, mk = blocks.shape
    if mk > THRESHOLD_BLOCKS:
        raise ValueError(f"{mk} key blocks: the fused threshold takes at most {THRESHOLD_BLOCKS}")
    blocks = blocks.float().contiguous()
    seen, must = (_bytes(x) for x in (seen, must.to(blocks.device)))
    seen = seen.expand(b, h, rows, mk)
    if isinstance(thresholds, torch.Tensor):
        thr = thresholds.to(blocks).reshape(-1).expand(h).contiguous()
    else:  # a fill on the device, no copy from the host
        thr = torch.full((h,), thresholds, dtype=torch.float32, device=blocks.device)
    out = torch.empty_like(blocks)
    size = max(16, triton.next_power_of_2(mk))
    _threshold_kernel[(rows, b * h)](
        blocks, seen, must, thr, out, mk, h, blocks.stride(1), blocks.stride(2),
        *seen.stride(), must.stride(0), out.stride(1), out.stride(2),
        BLOCK=size, CH=max(16, min(64, size, 16384 // size)), THRESHOLD_ONLY=threshold_only,
    )  # fmt: skip
    return out


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bytes, its rows contiguous: a view where it can be."""
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)


def block_shares(
    q: torch.Tensor,
    k: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    stride: int,
    block_size: int,
    scaling: float,
    block_n: int = 128,
    num_warps: int = 4,
    first: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    split_keys: int | None = None,
) -> torch.Tensor:
    """For each row r, the softmax-normalised antidiagonal estimate of the strided queries
    lo[r] .. hi[r] - 1 (at most block_size / stride of them), summed over them and into key
    blocks of ``block_size``: (B, H, R, Mk) float32, unnormalised, as ``XAttention.shares``
    forms it before dividing by the row's total. ``first`` (R,) int: the first key block
    row r needs (a sliding window's first visible one); the blocks before it may stay 0
    (those of its first key tile are summed), the softmax still runs over every causal
    strided key. None: from block 0.

    q: (B, H, T, D), k: (B, Hkv, Tk, D), both from position 0, H a multiple of Hkv; lo,
    hi: (R,) int. ``block_size / stride`` must be a power of two. bf16 and fp16 inputs
    multiply on the tensor cores (their products are exact in float32), float32 inputs in
    full float32. ``rows_per_program`` (a power of two; None: :func:`launch_tiles`' choice)
    rows share one sweep of the strided keys, in splits of ``split_keys`` strided keys
    (rounded up to whole key tiles; None: ``SPLIT_KEYS``), each its own program.
    """
    b, h, t, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    per = block_size // stride
    if block_size % stride or per & (per - 1):
        raise ValueError(f"block_size / stride must be a power of two, got {block_size}/{stride}")
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} key heads")
    if not q.is_cuda:  # the CPU interpreter multiplies bf16 bit patterns, not values
        q, k = q.float(), k.float()
    precision = "ieee" if q.dtype == torch.float32 else "native"
    k = k.to(q.dtype)
    nk, mk = triton.cdiv(tk, stride), triton.cdiv(tk, block_size)
    rows = lo.numel()
    tiles, stages = launch_tiles(d, stride, per, nk, precision, block_n, rows_per_program)
    out = torch.zeros(b * h, rows, mk, dtype=torch.float32, device=q.device)
    first = torch.zeros_like(lo) if first is None else first
    progs, rows_at = triton.cdiv(rows, tiles["G"]), tiles["G"] * tiles["BI"]
    n_tiles = triton.cdiv(nk, tiles["BN"])
    split = triton.cdiv(max(1, split_keys or SPLIT_KEYS), tiles["BN"]) * tiles["BN"]
    splits = triton.cdiv(n_tiles * tiles["BN"], split)
    # each program's strided queries' sums per key block, and the maximum they were taken
    # against per key tile (the tiles before the rows' first block's are never written);
    # each split's maximum and total per query
    f32 = dict(dtype=torch.float32, device=q.device)
    u = torch.empty(b * h, progs, rows_at, n_tiles * tiles["BN"] // per, **f32)
    mt = torch.empty(b * h, progs, rows_at, n_tiles, **f32)
    ml = torch.empty(b * h, progs, splits, 2 * rows_at, **f32)
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    first = first.to(torch.int32).contiguous()
    _block_share_kernel[(progs, splits, b * h)](
        q, k, lo, hi, first, u, mt, ml, rows, h, h // hkv, t, tk, nk, mk, d, split,
        float(scaling), *q.stride(), *k.stride(), u.stride(1), u.stride(2), mt.stride(1),
        mt.stride(2), ml.stride(1), ml.stride(2),
        **tiles, num_warps=num_warps, num_stages=stages,
    )  # fmt: skip
    _block_share_finish[(progs, b * h)](
        lo, hi, first, out, u, mt, ml, rows, nk, mk, splits, out.stride(0), out.stride(1),
        u.stride(1), u.stride(2), mt.stride(1), mt.stride(2), ml.stride(1), ml.stride(2),
        PER=per, G=tiles["G"], BI=tiles["BI"], BN=tiles["BN"], num_warps=num_warps,
    )  # fmt: skip
    return out.view(b, h, rows, mk)


def launch_tiles(
    d: int,
    stride: int,
    per: int,
    nk: int,
    precision: str,
    block_n: int = 128,
    rows_per_program: int | None = None,
) -> tuple[dict, int]:
    """The estimate kernel's constexprs and pipeline stages for head dim ``d``, ``per``
    strided queries a row, ``nk`` strided keys (the compile check launches these too).
    The product runs over S * d terms, 64 channels a step, so shared memory holds a step's
    tiles whatever the head dim. On the tensor cores (bf16, fp16) rows share a program
    (``G``) until it holds 64 strided queries, the tile a warp group multiplies, and each
    strided key read meets them all, 128 keys a step (at Gemma-3-270M's shapes on an H100,
    benchmarks_ref/xattention_estimate_h100.txt, timed with two sweeps at 1317760: 1.64 ms
    a global layer at 32k where 64 keys a step took 2.29 and the whole head dim at once,
    32 queries a program, 3.61);
    float32 tiles (the interpreter's, ``ieee``) take one row and at most 32 keys."""
    bi = max(16, triton.next_power_of_2(per))
    if precision == "ieee":
        g, block_n, stages = 1, min(block_n, 32), 2
    else:
        g, stages = max(1, 64 // bi), 3
    g = rows_per_program or g
    block_n = max(16, per, min(block_n, triton.next_power_of_2(nk)))
    bd = min(64, max(16, triton.next_power_of_2(d)))
    tiles = dict(
        S=stride, PER=per, G=g, BI=bi, BN=block_n, BD=bd, DP=triton.cdiv(d, bd) * bd,
        PRECISION=precision,
    )  # fmt: skip
    return tiles, stages
