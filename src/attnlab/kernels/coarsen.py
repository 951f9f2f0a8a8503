"""Triton kernels: max-L2 coarsening of queries or keys into blocks, and the tokens' norms.

Each block of ``block_size`` tokens is represented by its token of largest L2 norm, as in
``reference.coarsen_max_l2``. One program reads one block once, so the kernel runs at the
speed of reading Q and K from memory: at 128k tokens, 32 heads and D = 128 in bf16 that is
2 GiB, about 0.7 ms on an H100, the floor of the whole CAB predictor.

:func:`squared_norms` gives each token's squared norm alone: the order by which the
scoring path's coarsening (``reference.coarsen_max_l2``) ranks a block's tokens on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _coarsen_max_l2_kernel(
    x_ptr,
    out_ptr,
    H,
    N,
    D,
    sx_b,
    sx_h,
    sx_n,
    sx_d,
    so_b,
    so_h,
    so_m,
    so_d,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    b = bh // H
    h = bh % H
    tok = m * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    dd = tl.arange(0, BLOCK_D)
    x_base = x_ptr + b * sx_b + h * sx_h
    in_seq = tok < N
    x = tl.load(
        x_base + tok[:, None] * sx_n + dd[None, :] * sx_d,
        mask=in_seq[:, None] & (dd < D)[None, :],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_SIZE, BLOCK_D)
    norm = tl.sum(x * x, axis=1)
    norm = tl.where(in_seq, norm, -1.0)  # a ragged last block never picks padding
    best = tl.argmax(norm, axis=0, tie_break_left=True)
    row = tl.load(x_base + (m * BLOCK_SIZE + best) * sx_n + dd * sx_d, mask=dd < D)
    tl.store(out_ptr + b * so_b + h * so_h + m * so_m + dd * so_d, row, mask=dd < D)


def coarsen_max_l2(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Represent each block of ``block_size`` tokens by its token of largest L2 norm.

    x: (B, H, N, D) in any float dtype and any strides. Returns (B, H, M, D) in x's dtype,
    M = ceil(N / block_size); the last block may be ragged. Ties go to the earliest token,
    as in the reference. ``block_size`` must be a power of two.
    """
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    b, h, n, d = x.shape
    m = triton.cdiv(n, block_size)
    out = torch.empty(b, h, m, d, dtype=x.dtype, device=x.device)  # (B, H, M, D)
    _coarsen_max_l2_kernel[(m, b * h)](
        x,
        out,
        h,
        n,
        d,
        *x.stride(),
        *out.stride(),
        BLOCK_SIZE=block_size,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )
    return out


@triton.jit
def _squared_norms_kernel(
    x_ptr, out_ptr, H, N, D, sx_b, sx_h, sx_n, sx_d,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    b = bh // H
    h = bh % H
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    x = tl.load(
        x_ptr + b * sx_b + h * sx_h + tok[:, None] * sx_n + dd[None, :] * sx_d,
        mask=(tok < N)[:, None] & (dd < D)[None, :],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_T, BLOCK_D)
    tl.store(out_ptr + bh * N + tok, tl.sum(x * x, axis=1), mask=tok < N)


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Each token's squared L2 norm, summed in float32: x (B, H, N, D) in any float dtype
    and any strides -> (B, H, N) float32. One pass over x as it is stored (PyTorch's
    ``x.float().pow(2).sum(-1)`` makes three over a float32 copy); each square of a bf16
    or fp16 value is exact in float32, the sum rounds in the kernel's order."""
    b, h, n, d = x.shape
    out = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(64, 8192 // block_d))  # a tile of at most 8192 elements
    _squared_norms_kernel[(triton.cdiv(n, block_t), b * h)](
        x, out, h, n, d, *x.stride(), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4
    )
    return out
