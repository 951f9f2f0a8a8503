"""Triton kernels: coarse adjacency between blocks and its Forman-Ricci curvature.

Two launches. ``_adjacency_kernel`` gives each program a strip of query blocks (the
longest strips first) and sweeps their causal key blocks twice, flash-attention style: once
for the row maximum and sum (or the row minimum, for raw scores), once to write the
normalised rows of A. The same sweep leaves the row sums (out-degrees) and per-strip column
sums (in-degrees) behind, so no pass over A is spent on degrees. ``_forman_ricci_kernel``
gives each program one lower-triangular tile of F and accumulates the tile of A @ A over
only the k with j <= k <= i, where both factors can be non-zero: a sixth of a dense
M x M x M product, ordered longest first so that the triangle's uneven work balances.

A is block-causal. In the fused pipeline the adjacency kernel writes its zeros above the
diagonal only as far as the curvature tile's edge, the curvature kernel reads nothing
beyond, and the tiles wholly above the diagonal are never written or read. Measured on the
H100 at 128k tokens, 32 heads, block 64 (M = 2048): adjacency 0.25 ms with A in bf16, and
~100 GFLOP of A @ A in 0.34 ms with 128 x 128 tiles in bf16 (1.5 ms in tf32 from a float32 A).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PRECISIONS = ("ieee", "tf32", "bf16")


@triton.jit
def _mm(x, y, acc, PRECISION: tl.constexpr):
    if PRECISION == "bf16":
        acc = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
    elif PRECISION == "native":
        acc = tl.dot(x, y, acc)
    else:
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _adjacency_kernel(
    qc_ptr,
    kc_ptr,
    a_ptr,
    rowsum_ptr,
    colsum_ptr,
    H,
    GROUPS,
    Mq,
    Mk,
    D,
    q_offset,
    scaling,
    sq_b,
    sq_h,
    sq_m,
    sq_d,
    sk_b,
    sk_h,
    sk_m,
    sk_d,
    sa_bh,
    sa_m,
    sa_n,
    sc_bh,
    sc_r,
    SOFTMAX: tl.constexpr,
    FILL_UPPER: tl.constexpr,
    ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest strips first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    row_ok = rows < Mq
    q = tl.load(
        qc_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_m + dd[None, :] * sq_d,
        mask=row_ok[:, None] & (dd < D)[None, :],
        other=0.0,
    )  # (BM, BD)
    k_base = kc_ptr + b * sk_b + (h // GROUPS) * sk_h
    hi = tl.minimum(Mk, q_offset + (pid + 1) * BM)  # causal columns of this strip end here

    if SOFTMAX:
        m_i = tl.full((BM,), float("-inf"), tl.float32)
    else:
        m_i = tl.full((BM,), float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    for j0 in range(0, hi, BN):
        cols = j0 + tl.arange(0, BN)
        kt = tl.load(
            k_base + cols[None, :] * sk_m + dd[:, None] * sk_d,
            mask=(cols < Mk)[None, :] & (dd < D)[:, None],
            other=0.0,
        )  # (BD, BN)
        s = _mm(q, kt, tl.zeros((BM, BN), tl.float32), PRECISION) * scaling
        causal = (cols[None, :] <= rows[:, None] + q_offset) & (cols < Mk)[None, :]
        if SOFTMAX:
            s = tl.where(causal, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
        else:
            m_i = tl.minimum(m_i, tl.min(tl.where(causal, s, float("inf")), axis=1))

    m_safe = tl.where((m_i == float("-inf")) | (m_i == float("inf")), 0.0, m_i)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if FILL_UPPER:
        stop = Mk
    else:  # zeros above the diagonal up to the curvature tile's edge, which reads them
        stop = tl.minimum(Mk, tl.cdiv(q_offset + (pid + 1) * BM, ALIGN) * ALIGN)
    rowsum = tl.zeros((BM,), tl.float32)
    a_base = a_ptr + bh * sa_bh
    for j0 in range(0, stop, BN):
        cols = j0 + tl.arange(0, BN)
        kt = tl.load(
            k_base + cols[None, :] * sk_m + dd[:, None] * sk_d,
            mask=(cols < Mk)[None, :] & (dd < D)[:, None],
            other=0.0,
        )
        s = _mm(q, kt, tl.zeros((BM, BN), tl.float32), PRECISION) * scaling
        causal = (cols[None, :] <= rows[:, None] + q_offset) & (cols < Mk)[None, :]
        causal = causal & row_ok[:, None]
        if SOFTMAX:
            p = tl.exp(s - m_safe[:, None]) / l_safe[:, None]
        else:
            p = s - m_safe[:, None]
        p = tl.where(causal, p, 0.0)  # (BM, BN)
        tl.store(
            a_base + rows[:, None] * sa_m + cols[None, :] * sa_n,
            p.to(a_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (cols < Mk)[None, :],
        )
        rowsum += tl.sum(p, axis=1)
        tl.store(colsum_ptr + bh * sc_bh + pid * sc_r + cols, tl.sum(p, axis=0), mask=cols < Mk)
    tl.store(rowsum_ptr + bh * Mq + rows, rowsum, mask=row_ok)


@triton.jit
def _tile(base, rows, cols, M, s_m, s_n, EVEN: tl.constexpr):
    ptrs = base + rows[:, None] * s_m + cols[None, :] * s_n
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows < M)[:, None] & (cols < M)[None, :], other=0.0)


@triton.jit
def _sym_tile(base, rows, cols, M, s_m, s_n):
    # W[rows, cols] with W = (A + A^T) / 2 and a zero diagonal, from the lower triangle of A
    ok_low = (rows[:, None] < M) & (cols[None, :] < M) & (cols[None, :] < rows[:, None])
    low = tl.load(base + rows[:, None] * s_m + cols[None, :] * s_n, mask=ok_low, other=0.0)
    ok_up = (cols[:, None] < M) & (rows[None, :] < M) & (rows[None, :] < cols[:, None])
    up = tl.load(base + cols[:, None] * s_m + rows[None, :] * s_n, mask=ok_up, other=0.0)
    return 0.5 * (low + tl.trans(up))


@triton.jit
def _forman_ricci_kernel(
    a_ptr,
    deg_r_ptr,
    deg_c_ptr,
    f_ptr,
    tile_i_ptr,
    tile_j_ptr,
    M,
    sa_bh,
    sa_m,
    sa_n,
    sf_bh,
    sf_m,
    sf_n,
    SYMMETRIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    EVEN: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    it = tl.load(tile_i_ptr + t)
    jt = tl.load(tile_j_ptr + t)
    rows = it * BT + tl.arange(0, BT)
    cols = jt * BT + tl.arange(0, BT)
    a_base = a_ptr + bh * sa_bh
    acc = tl.zeros((BT, BT), tl.float32)  # tile of A @ A (or W @ W)
    if SYMMETRIC:
        for k0 in range(0, M, BK):
            ks = k0 + tl.arange(0, BK)
            w_ik = _sym_tile(a_base, rows, ks, M, sa_m, sa_n)
            w_kj = _sym_tile(a_base, ks, cols, M, sa_m, sa_n)
            acc = _mm(w_ik, w_kj, acc, PRECISION)
        w = _sym_tile(a_base, rows, cols, M, sa_m, sa_n)
    else:  # A[i, k] A[k, j] can be non-zero only for j <= k <= i
        for k0 in range(jt * BT, tl.minimum((it + 1) * BT, M), BK):
            ks = k0 + tl.arange(0, BK)
            a_ik = _tile(a_base, rows, ks, M, sa_m, sa_n, EVEN)
            a_kj = _tile(a_base, ks, cols, M, sa_m, sa_n, EVEN)
            acc = _mm(a_ik, a_kj, acc, PRECISION)
        w = _tile(a_base, rows, cols, M, sa_m, sa_n, EVEN)
    d_r = tl.load(deg_r_ptr + bh * M + rows, mask=rows < M, other=0.0)
    d_c = tl.load(deg_c_ptr + bh * M + cols, mask=cols < M, other=0.0)
    f = 4.0 * w - d_r[:, None] - d_c[None, :] + 3.0 * acc
    tl.store(
        f_ptr + bh * sf_bh + rows[:, None] * sf_m + cols[None, :] * sf_n,
        f,
        mask=(rows < M)[:, None] & (cols < M)[None, :],
    )


_TILE_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _lower_tiles(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row tile, column tile) of every lower-triangular tile, the longest k-loop first."""
    key = (n_tiles, str(device))
    if key not in _TILE_CACHE:
        pairs = [(i, j) for i in range(n_tiles) for j in range(i + 1)]
        pairs.sort(key=lambda p: p[1] - p[0])  # i - j largest first
        ti = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
        tj = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
        _TILE_CACHE[key] = (ti, tj)
    return _TILE_CACHE[key]


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def adjacency_and_degrees(
    qc: torch.Tensor,
    kc: torch.Tensor,
    scaling: float,
    adjacency: str = "softmax",
    q_offset: int = 0,
    fill_upper: bool = True,
    precision: str = "tf32",
    a_dtype: torch.dtype = torch.float32,
    block_m: int = 64,
    block_n: int = 64,
    align: int = 128,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse adjacency A with its row sums and column sums, in one sweep.

    qc: (B, H, Mq, D) coarse queries of blocks q_offset .. q_offset + Mq - 1; kc: (B, Hkv,
    Mk, D) coarse keys, H a multiple of Hkv. Returns A (B, H, Mq, Mk) in ``a_dtype`` as in
    ``reference.coarse_adjacency``, and its float32 row sums (B, H, Mq) and column sums
    (B, H, Mk). With ``fill_upper=False`` each strip of ``block_m`` rows writes its zeros
    above the diagonal only up to the next multiple of ``align`` columns (the curvature
    tile), and leaves the rest unwritten. ``precision`` applies to float32 inputs; bf16 and
    fp16 inputs use the tensor cores as they are.
    """
    if adjacency not in ("softmax", "scores"):
        raise ValueError(f"adjacency must be 'softmax' or 'scores', got {adjacency!r}")
    _check_precision(precision)
    b, h, mq, d = qc.shape
    hkv, mk = kc.shape[1], kc.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} key heads")
    if kc.dtype != qc.dtype:
        kc = kc.to(qc.dtype)
    if not qc.is_cuda:  # the CPU interpreter multiplies bf16 bit patterns, not values
        qc, kc, precision = qc.float(), kc.float(), "ieee"
    block_m = max(16, min(block_m, triton.next_power_of_2(mq)))
    block_n = max(16, min(block_n, triton.next_power_of_2(mk)))
    n_strips = triton.cdiv(mq, block_m)
    a = torch.empty(b, h, mq, mk, dtype=a_dtype, device=qc.device)  # (B, H, Mq, Mk)
    rowsum = torch.empty(b, h, mq, dtype=torch.float32, device=qc.device)
    colsum = torch.zeros(b * h, n_strips, mk, dtype=torch.float32, device=qc.device)
    _adjacency_kernel[(n_strips, b * h)](
        qc, kc, a, rowsum, colsum,
        h, h // hkv, mq, mk, d, q_offset, float(scaling),
        *qc.stride(), *kc.stride(),
        mq * mk, a.stride(2), a.stride(3), colsum.stride(0), colsum.stride(1),
        SOFTMAX=adjacency == "softmax", FILL_UPPER=fill_upper, ALIGN=max(align, block_n),
        PRECISION=precision if qc.dtype == torch.float32 else "native",
        BM=block_m, BN=block_n, BD=max(16, triton.next_power_of_2(d)),
        num_warps=num_warps,
    )  # fmt: skip
    return a, rowsum, colsum.sum(1).view(b, h, mk)  # deterministic in-degree sum


def coarse_adjacency(
    qc: torch.Tensor,
    kc: torch.Tensor,
    scaling: float,
    adjacency: str = "softmax",
    q_offset: int = 0,
    precision: str = "tf32",
) -> torch.Tensor:
    """Triton version of ``reference.coarse_adjacency``: (B, H, Mq, Mk) float32 A."""
    return adjacency_and_degrees(qc, kc, scaling, adjacency, q_offset, True, precision)[0]


def forman_ricci_from_degrees(
    a: torch.Tensor,
    d_out: torch.Tensor,
    d_in: torch.Tensor,
    graph: str = "symmetric",
    precision: str = "tf32",
    block: int = 128,
    block_k: int | None = None,
    num_stages: int = 3,
) -> torch.Tensor:
    """Forman-Ricci curvature of the lower-triangular tiles of a block-causal graph.

    a: (B, H, M, M) float32 or bf16, zero above its diagonal inside the diagonal tiles of
    ``block`` (tiles wholly above are never read); d_out, d_in: (B, H, M) its row and
    column sums. Returns F (B, H, M, M) float32 whose tiles on and below the diagonal hold
    F = 4W - D_i - D_j + 3 W @ W (W = A for "directed", (A + A^T) / 2 without its diagonal
    for "symmetric"); tiles above the diagonal are left unwritten. ``precision`` is that of
    a float32 A in the product; a bf16 A multiplies as it is. ``block_k`` (the k step)
    defaults to what keeps three pipeline stages within the H100's shared memory.
    """
    if graph not in ("directed", "symmetric"):
        raise ValueError(f"graph must be 'directed' or 'symmetric', got {graph!r}")
    _check_precision(precision)
    b, h, m, _ = a.shape
    a = a.contiguous()
    if not a.is_cuda:
        precision = "ieee"
    if a.dtype != torch.float32:
        precision = "native"
    if graph == "symmetric":
        deg = 0.5 * (d_out + d_in) - torch.diagonal(a, dim1=-2, dim2=-1).float()
        deg_r = deg_c = deg.contiguous()
    else:
        deg_r, deg_c = d_out.contiguous(), d_in.contiguous()
    block = max(16, min(block, triton.next_power_of_2(m)))
    if block_k is None:
        block_k = (64 if a.element_size() == 2 else 32) // (2 if graph == "symmetric" else 1)
    block_k = max(16, min(block_k, block))
    tile_i, tile_j = _lower_tiles(triton.cdiv(m, block), a.device)
    f = torch.empty(b, h, m, m, dtype=torch.float32, device=a.device)  # (B, H, M, M)
    _forman_ricci_kernel[(tile_i.numel(), b * h)](
        a, deg_r, deg_c, f, tile_i, tile_j,
        m, m * m, a.stride(2), a.stride(3), m * m, f.stride(2), f.stride(3),
        SYMMETRIC=graph == "symmetric", PRECISION=precision,
        BT=block, BK=block_k, EVEN=m % block == 0,
        num_warps=8 if block >= 128 else 4, num_stages=num_stages,
    )  # fmt: skip
    return f


def forman_ricci(
    a: torch.Tensor, graph: str = "symmetric", precision: str = "tf32"
) -> torch.Tensor:
    """Triton version of ``reference.forman_ricci`` for a block-causal (lower-triangular) A.

    a: (B, H, M, M); entries above the diagonal are taken as 0. Returns F (B, H, M, M)
    float32 equal to the reference everywhere: the kernel fills the lower tiles and the
    upper ones follow in closed form (-D_i - D_j when directed, F^T when symmetric).
    """
    a = torch.tril(a.float())
    d_out, d_in = a.sum(-1), a.sum(-2)
    f = forman_ricci_from_degrees(a, d_out, d_in, graph, precision)
    m = a.shape[-1]
    upper = torch.ones(m, m, dtype=torch.bool, device=a.device).triu(1)
    if graph == "symmetric":
        return torch.where(upper, f.transpose(-1, -2), f)
    return torch.where(upper, -d_out.unsqueeze(-1) - d_in.unsqueeze(-2), f)
