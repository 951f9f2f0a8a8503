"""Triton kernel: Quest's page bound for a batch of query rows, on the tensor cores.

sum_d max(q_d min_d, q_d max_d) = max(q, 0) . max + min(q, 0) . min, two products of one
tile accumulated in float32. Where Q and the keys are bf16 (a GPU model's), the rows'
halves and the pages' channel extremes are bf16 values too, so each product is exact in
float32 and the bound is PyTorch's float32 one (``policies.quest.upper_bound``) up to
summation order, from the tensor cores instead of float32 matrix products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.adjacency import _mm

BOUND_WARPS = 4  # page_bound's launches (the compile check's too)


@triton.jit
def _bound_kernel(
    q_ptr, lo_ptr, hi_ptr, out_ptr, first_ptr, last_ptr,
    H, GROUPS, TQ, P, D,
    sq_b, sq_h, sq_t, sq_d, sp_b, sp_h, sp_p, sp_d, so_bh, so_t,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
    BANDS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(2).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    p0 = tl.program_id(1) * BN
    pages = p0 + tl.arange(0, BN)
    q_base = q_ptr + b * sq_b + h * sq_h
    p_off = b * sp_b + (h // GROUPS) * sp_h
    acc = tl.zeros((BM, BN), tl.float32)
    busy = True
    if BANDS:  # a tile wholly outside every row's band of pages: no product, -inf
        first = tl.load(first_ptr + rows, mask=rows < TQ, other=P)
        last = tl.load(last_ptr + rows, mask=rows < TQ, other=-1)
        busy = (p0 <= tl.max(last, axis=0)) & (p0 + BN > tl.min(first, axis=0))
    for d0 in range(0, tl.where(busy, D, 0), BD):
        dd = d0 + tl.arange(0, BD)
        q = tl.load(
            q_base + rows[:, None] * sq_t + dd[None, :] * sq_d,
            mask=(rows < TQ)[:, None] & (dd < D)[None, :],
            other=0.0,
        )  # (BM, BD)
        ok = (pages < P)[None, :] & (dd < D)[:, None]
        at = pages[None, :] * sp_p + dd[:, None] * sp_d
        hi = tl.load(hi_ptr + p_off + at, mask=ok, other=0.0)  # (BD, BN)
        lo = tl.load(lo_ptr + p_off + at, mask=ok, other=0.0)
        acc = _mm(tl.maximum(q, 0.0).to(q.dtype), hi, acc, PRECISION)
        acc = _mm(tl.minimum(q, 0.0).to(q.dtype), lo, acc, PRECISION)
    tl.store(
        out_ptr + bh * so_bh + rows[:, None] * so_t + pages[None, :],
        tl.where(busy, acc, float("-inf")),
        mask=(rows < TQ)[:, None] & (pages < P)[None, :],
    )


def page_bound(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    block: int = 64,
    bands: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton version of ``policies.quest.upper_bound``: q (B, H, Tq, D), kmin, kmax
    (B, Hkv, P, D) the pages' channel extremes (H a multiple of Hkv) -> (B, H, Tq, P)
    float32. bf16 or fp16 inputs multiply on the tensor cores (exact products), float32
    ones in full float32. ``bands``: each row's first and last page it can keep, (Tq,)
    ints each (a prefill's causal edge and window): a tile of pages wholly outside every
    band of its rows is not multiplied, its bounds -inf (a selection never reads them)."""
    b, h, tq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} key heads")
    if not q.is_cuda:  # the CPU interpreter multiplies bf16 bit patterns, not values
        q = q.float()
    kmin, kmax = kmin.to(q.dtype).contiguous(), kmax.to(q.dtype).contiguous()
    tiles = bound_tiles(tq, p, d, q.dtype, block)
    out = torch.empty(b * h, tq, p, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(tq, tiles["BM"]), triton.cdiv(p, tiles["BN"]), b * h)
    first, last = (
        (out, out) if bands is None else (e.to(q.device, torch.int32).contiguous() for e in bands)
    )  # never read without bands
    _bound_kernel[grid](
        q, kmin, kmax, out, first, last,
        h, h // hkv, tq, p, d,
        *q.stride(), *kmin.stride(), out.stride(0), out.stride(1),
        **tiles, num_warps=BOUND_WARPS, BANDS=bands is not None,
    )  # fmt: skip
    return out.view(b, h, tq, p)


def bound_tiles(tq: int, p: int, d: int, dtype: torch.dtype, block: int = 64) -> dict:
    """The constants :func:`page_bound` launches its kernel with for ``tq`` rows, ``p``
    pages of ``d`` channels in ``dtype`` (the compile check builds the same)."""
    return dict(
        BM=max(16, min(block, triton.next_power_of_2(tq))),
        BN=max(16, min(block, triton.next_power_of_2(p))),
        BD=max(16, min(64, triton.next_power_of_2(d))),
        PRECISION="ieee" if dtype == torch.float32 else "native",
    )
