"""Triton kernels: Forman-Ricci curvature of the coarse graph, in CAB's two forms.

``_forman_ricci_kernel`` (the prompt form: the whole prompt's graph) gives each program
one lower-triangular tile of F and accumulates the tile of A @ A over only the k with
j <= k <= i, where both factors can be non-zero (the symmetric graph's W @ W over every k,
W formed once by ``_symmetrize_kernel``): a sixth of a dense M x M x M product,
ordered longest first so that the triangle's uneven work balances (:func:`_lower_tiles`).
The tiles wholly above the diagonal are never written or read. Measured on the H100 at
128k tokens, 32 heads, block 64 (M = 2048): ~100 GFLOP of A @ A in 0.34 ms with
128 x 128 tiles in bf16 (1.5 ms in tf32 from a float32 A). A comes from
:mod:`attnlab.kernels.adjacency`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnlab.kernels.adjacency import _check_precision, _mm

GRAPHS = ("symmetric", "directed", "rowsum")  # the graphs whose curvature the kernels form
# the k step of a float32 and a bf16 A, halved for the symmetric graph (the steps of the
# kernel that formed W inside its product, four tiles a step) except for a float32 A in a
# window's band tiles (under 64 blocks): on an H100 at 32k, 16-token blocks, ieee
# products, the symmetric curvature of a causal layer 1.18 ms in steps of 16 (1.28 in 32,
# 1.55 in 64), of a window layer's band tiles of 16 0.35 ms in steps of 32 (0.43 in 16);
# every step's F equal bit for bit (benchmarks_ref/curvature_symmetrized_h100.txt: the
# ieee products accumulate k by k whatever the step; tf32 and bf16 not compared)
BLOCK_K = {False: 32, True: 64}


@triton.jit
def _tile(base, rows, cols, M, s_m, s_n, EVEN: tl.constexpr):
    ptrs = base + rows[:, None] * s_m + cols[None, :] * s_n
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(rows < M)[:, None] & (cols < M)[None, :], other=0.0)


@triton.jit
def _sym_tile(base, rows, cols, M, s_m, s_n):
    # W[rows, cols] in float32, W = (A + A^T) / 2 with a zero diagonal, from A's lower triangle
    ok_low = (rows[:, None] < M) & (cols[None, :] < M) & (cols[None, :] < rows[:, None])
    low = tl.load(base + rows[:, None] * s_m + cols[None, :] * s_n, mask=ok_low, other=0.0)
    ok_up = (cols[:, None] < M) & (rows[None, :] < M) & (rows[None, :] < cols[:, None])
    up = tl.load(base + cols[:, None] * s_m + rows[None, :] * s_n, mask=ok_up, other=0.0)
    return 0.5 * (low.to(tl.float32) + tl.trans(up).to(tl.float32))


@triton.jit
def _symmetrize_kernel(a_ptr, w_ptr, M, s_bh, s_m, s_n, BT: tl.constexpr):
    # one tile of W = (A + A^T) / 2 without its diagonal, from A's lower triangle: one of
    # the two terms is zero, so float32 and back to A's dtype rounds as A's own arithmetic
    # (which Triton's interpreter gets wrong in bf16)
    bh = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BT + tl.arange(0, BT)
    w = _sym_tile(a_ptr + bh * s_bh, rows, cols, M, s_m, s_n)
    ok = (rows < M)[:, None] & (cols < M)[None, :]
    out = w_ptr + bh * M * M + rows[:, None] * M + cols[None, :]
    tl.store(out, w.to(w_ptr.dtype.element_ty), mask=ok)


def symmetrized(a: torch.Tensor) -> torch.Tensor:
    """W = (A + A^T) / 2 without its diagonal, (B, H, M, M) contiguous in A's dtype, from
    the strict lower triangle of a block-causal A (nothing above the diagonal is read):
    the symmetric graph's weights, formed once so that the curvature's products read
    plain tiles (two loads a step, where forming W inside read four, masked, one
    transposed)."""
    a = a.contiguous()  # one stride across batch and heads
    b, h, m, _ = a.shape
    w = torch.empty(b, h, m, m, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, 64), triton.cdiv(m, 64), b * h)
    _symmetrize_kernel[grid](a, w, m, m * m, a.stride(2), a.stride(3), BT=64)
    return w


@triton.jit
def _in_a_band(first_ptr, rows, jt, M, BT: tl.constexpr):
    # whether some row of the tile can keep one of its columns: a row's band starts at its
    # first key block (a sliding window's edge, 0 in a causal layer); the tiles wholly
    # left of every band skip the product, their entries never read by a selection
    first = tl.load(first_ptr + rows, mask=rows < M, other=M)
    return jt * BT + BT > tl.min(first, axis=0)


@triton.jit
def _forman_ricci_kernel(
    a_ptr,
    deg_r_ptr,
    deg_c_ptr,
    f_ptr,
    tile_i_ptr,
    tile_j_ptr,
    first_ptr,
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
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    it = tl.load(tile_i_ptr + t)
    jt = tl.load(tile_j_ptr + t)
    rows = it * BT + tl.arange(0, BT)
    cols = jt * BT + tl.arange(0, BT)
    a_base = a_ptr + bh * sa_bh
    acc = tl.zeros((BT, BT), tl.float32)  # tile of A @ A (or W @ W)
    busy = _in_a_band(first_ptr, rows, jt, M, BT)
    if SYMMETRIC:  # a_ptr holds W (symmetrized): every k
        for k0 in range(0, tl.where(busy, M, 0), BK):
            ks = k0 + tl.arange(0, BK)
            w_ik = _tile(a_base, rows, ks, M, sa_m, sa_n, EVEN)
            w_kj = _tile(a_base, ks, cols, M, sa_m, sa_n, EVEN)
            acc = _mm(w_ik, w_kj, acc, PRECISION)
        w = _tile(a_base, rows, cols, M, sa_m, sa_n, EVEN)
    else:  # A[i, k] A[k, j] can be non-zero only for j <= k <= i
        for k0 in range(jt * BT, tl.where(busy, tl.minimum((it + 1) * BT, M), jt * BT), BK):
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


_TILE_CACHE: dict[tuple[int, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _lower_tiles(
    n_tiles: int, device: torch.device, graph: str = "directed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row tile, column tile) of every lower-triangular tile, the longest k-loop first:
    a directed graph's tile (i, j) sums over k from j to i, so i - j largest first; a
    symmetric graph's sums over every k (the prompt form) or every k up to i (the causal
    form), so the last rows first, each row's from its diagonal leftwards: under a sliding
    window the tiles by the diagonal are the ones whose products run, and they start
    first instead of after every skipped tile (on an H100 at 32k in 16-token blocks, the
    causal form's curvature of a window layer 0.652 ms against 0.759 in i - j order, of a
    causal layer 2.642 against 2.799; the same tiles, so the same F)."""
    key = (n_tiles, str(device), graph)
    if key not in _TILE_CACHE:
        pairs = [(i, j) for i in range(n_tiles) for j in range(i + 1)]
        if graph == "symmetric":
            pairs.sort(key=lambda p: (-p[0], -p[1]))
        else:
            pairs.sort(key=lambda p: p[1] - p[0])  # i - j largest first
        ti = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
        tj = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
        _TILE_CACHE[key] = (ti, tj)
    return _TILE_CACHE[key]


def _firsts(first: torch.Tensor | None, m: int, device) -> torch.Tensor:
    """Each query block's first key block as the kernels read it: (M,) int32."""
    if first is None:
        return torch.zeros(m, dtype=torch.int32, device=device)
    return first.to(device=device, dtype=torch.int32).contiguous()


def forman_ricci_from_degrees(
    a: torch.Tensor,
    d_out: torch.Tensor,
    d_in: torch.Tensor,
    graph: str = "symmetric",
    precision: str = "tf32",
    block: int = 128,
    block_k: int | None = None,
    num_stages: int = 3,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forman-Ricci curvature of the lower-triangular tiles of a block-causal graph.

    a: (B, H, M, M) float32 or bf16, zero above its diagonal inside the diagonal tiles of
    ``block`` (tiles wholly above are never read); d_out, d_in: (B, H, M) its row and
    column sums. Returns F (B, H, M, M) float32 whose tiles on and below the diagonal hold
    F = 4W - D_i - D_j + 3 W @ W (W = A for "directed", with D_j the row sum of j for
    "rowsum", (A + A^T) / 2 without its diagonal for "symmetric"); tiles above the
    diagonal are left unwritten. ``precision`` is that of
    a float32 A in the product; a bf16 A multiplies as it is. ``block_k`` (the k step)
    defaults to what keeps three pipeline stages within the H100's shared memory
    (:data:`BLOCK_K`); a symmetric tile's product runs over every k of W
    (:func:`symmetrized`, formed once), so its step may pass the tile.
    ``first`` (M,) int: the first key block each query block can keep (a sliding window's
    edge); a tile wholly left of the bands of all its rows skips the product (under a
    512-key window at 32k in 16-token blocks, 105 of the 136 tiles of 128 blocks): its
    entries hold 4W - D_i - D_j, read by no selection. None: every tile whole.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
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
    elif graph == "rowsum":  # the row sums at both ends
        deg_r = deg_c = d_out.contiguous()
    else:
        deg_r, deg_c = d_out.contiguous(), d_in.contiguous()
    block = max(16, min(block, triton.next_power_of_2(m)))
    symmetric = graph == "symmetric"
    if block_k is None:  # (BLOCK_K)
        bf16 = a.element_size() == 2
        block_k = BLOCK_K[bf16] // (2 if symmetric and (bf16 or block >= 64) else 1)
    # the directed k range starts and ends on tile edges; the symmetric one spans M
    block_k = max(16, min(block_k, triton.next_power_of_2(m) if symmetric else block))
    while block_k > 16 and m % block_k and m % block == 0:  # whole steps: EVEN loads
        block_k //= 2
    tile_i, tile_j = _lower_tiles(triton.cdiv(m, block), a.device, graph)
    f = torch.empty(b, h, m, m, dtype=torch.float32, device=a.device)  # (B, H, M, M)
    w = symmetrized(a) if symmetric else a
    _forman_ricci_kernel[(tile_i.numel(), b * h)](
        w, deg_r, deg_c, f, tile_i, tile_j, _firsts(first, m, a.device),
        m, m * m, w.stride(2), w.stride(3), m * m, f.stride(2), f.stride(3),
        SYMMETRIC=symmetric, PRECISION=precision,
        BT=block, BK=block_k, EVEN=m % block == 0,  # whole tiles, so whole steps (above)
        num_warps=8 if block >= 128 else 4, num_stages=num_stages,
    )  # fmt: skip
    return f


def forman_ricci(
    a: torch.Tensor, graph: str = "symmetric", precision: str = "tf32"
) -> torch.Tensor:
    """Triton version of ``reference.forman_ricci`` for a block-causal (lower-triangular) A.

    a: (B, H, M, M); entries above the diagonal are taken as 0. Returns F (B, H, M, M)
    float32 equal to the reference everywhere: the kernel fills the lower tiles and the
    upper ones follow in closed form (-D_i - D_j when directed, with D_j the row sum of j
    for rowsum; F^T when symmetric).
    """
    a = torch.tril(a.float())
    d_out, d_in = a.sum(-1), a.sum(-2)
    f = forman_ricci_from_degrees(a, d_out, d_in, graph, precision)
    m = a.shape[-1]
    upper = torch.ones(m, m, dtype=torch.bool, device=a.device).triu(1)
    if graph == "symmetric":
        return torch.where(upper, f.transpose(-1, -2), f)
    d_j = d_out if graph == "rowsum" else d_in
    return torch.where(upper, -d_out.unsqueeze(-1) - d_j.unsqueeze(-2), f)


@triton.jit
def _causal_curvature_kernel(
    ar_ptr, af_ptr, wf_ptr, pre_ptr, d_row_ptr, d_key_ptr, f_ptr, tile_i_ptr, tile_j_ptr, first_ptr,
    M, s_bh, s_m, s_pre_bh, s_pre_t,
    SYMMETRIC: tl.constexpr, ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # F of the causal form, one lower tile: row b is query block b's scoring row, A_row[b]
    # its coarse row (blocks 0..b), A_full the complete blocks' rows (only those before b
    # are read for row b)
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: B H T D may pass 2^31
    it = tl.load(tile_i_ptr + t)
    jt = tl.load(tile_j_ptr + t)
    rows = it * BT + tl.arange(0, BT)
    cols = jt * BT + tl.arange(0, BT)
    ok = (rows < M)[:, None] & (cols < M)[None, :] & (cols[None, :] <= rows[:, None])
    ar_base = ar_ptr + bh * s_bh
    af_base = af_ptr + bh * s_bh
    acc = tl.zeros((BT, BT), tl.float32)  # sum over k < b of A_row[b, k] X[k, j]
    sq = tl.zeros((BT,), tl.float32)  # sum over k < b of W_row[b, k]^2
    k_lo = 0
    if not SYMMETRIC:  # A_full[k, j] is zero for k < j
        k_lo = jt * BT
    busy = _in_a_band(first_ptr, rows, jt, M, BT)
    for k0 in range(k_lo, tl.where(busy, tl.minimum((it + 1) * BT, M), k_lo), BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(
            ar_base + rows[:, None] * s_m + ks[None, :],
            mask=(rows < M)[:, None] & (ks[None, :] < rows[:, None]),
            other=0.0,
        ).to(tl.float32)  # (BT, BK): the row's weights on complete blocks
        if SYMMETRIC:
            x = 0.5 * x
            sq += tl.sum(x * x, axis=1)
            y = _tile(wf_ptr + bh * s_bh, ks, cols, M, s_m, 1, False)  # W_full, symmetrized
        else:
            y = _tile(af_base, ks, cols, M, s_m, 1, False)
        acc = _mm(x, y.to(tl.float32), acc, PRECISION)
    a = tl.load(ar_base + rows[:, None] * s_m + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    a_bb = tl.load(ar_base + rows * s_m + rows, mask=rows < M, other=0.0).to(tl.float32)
    # in-weight of j from query blocks before b: complete tiles' prefix + this tile's rows
    lower = tl.load(af_base + rows[:, None] * s_m + cols[None, :], mask=ok, other=0.0)
    r = tl.arange(0, BT)
    tri = (r[None, :] < r[:, None]).to(tl.float32)  # rows i of the tile before row b
    pre = tl.load(pre_ptr + bh * s_pre_bh + it * s_pre_t + cols, mask=cols < M, other=0.0)
    before = _mm(tri, lower.to(tl.float32), tl.zeros((BT, BT), tl.float32), PRECISION)
    before += pre[None, :]
    d_row = tl.load(d_row_ptr + bh * M + rows, mask=rows < M, other=0.0)
    d_key = tl.load(d_key_ptr + bh * M + cols, mask=cols < M, other=0.0)
    diag = cols[None, :] == rows[:, None]
    if SYMMETRIC:
        w = tl.where(diag, 0.0, 0.5 * a)
        d_own = 0.5 * (d_row - a_bb)
        d_j = 0.5 * (d_key[None, :] + before + a)
        f = 4.0 * w - d_own[:, None] - d_j + 3.0 * acc
        f = tl.where(diag, (-2.0 * d_own + 3.0 * sq)[:, None], f)
    else:  # two hops through complete blocks, and through b itself
        if ROWSUM:  # j's own row sum: complete for j < b, the row's own for j = b
            d_j = tl.where(diag, d_row[:, None], d_key[None, :])
        else:  # j's in-degree from query blocks 0..b
            d_j = before + a
        f = 4.0 * a - d_row[:, None] - d_j + 3.0 * (acc + a_bb[:, None] * a)
    tl.store(f_ptr + bh * s_bh + rows[:, None] * s_m + cols[None, :], f, mask=ok)


def causal_forman_ricci(
    a_row: torch.Tensor,
    a_full: torch.Tensor,
    d_row: torch.Tensor,
    d_full: torch.Tensor,
    prefix: torch.Tensor,
    graph: str = "symmetric",
    precision: str = "tf32",
    block: int = 64,
    block_k: int = 32,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forman-Ricci curvature of CAB's causal form, as ``reference.cab_row_scores`` forms
    it at each query block's scoring row (its first, or its last in the query-aware prompt
    form; degrees over blocks at or before the row's).

    a_row: (B, H, M, M) block b's row as the row scoring it sees it (its first, or its
    last in the query-aware prompt form; zero beyond b); a_full:
    (B, H, M, M) the complete blocks' rows, both zero above their diagonals inside the
    diagonal tiles of ``block``; d_row: (B, H, M) a_row's row sums; d_full: (B, H, M)
    a_full's row sums; prefix: (B * H, ceil(M / block), M) column sums of a_full over the
    rows before each tile of ``block`` rows. Returns F (B, H, M, M) float32, written on
    and below the diagonal: symmetric, 4 W_bj - D(b) - D(j) + 3 (W_row W_full)_bj with
    W = (A + A^T) / 2 without self-loops and the degrees of blocks 0..b, the diagonal
    -2 D(b) + 3 |W_row|^2; directed, 4 A_bj - D_out(b) - D_in(j) + 3 (A A)_bj with j's
    in-degree from query blocks 0..b; rowsum, the same with j's row sum for D_in(j).
    ``first``: as in :func:`forman_ricci_from_degrees`.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    _check_precision(precision)
    b, h, m, _ = a_row.shape
    if not a_row.is_cuda:
        precision = "ieee"
    d_key = d_full
    if graph == "symmetric":  # j's complete row and column, without its self-loop twice
        d_key = d_full - 2.0 * torch.diagonal(a_full, dim1=-2, dim2=-1).float()
    tile_i, tile_j = _lower_tiles(triton.cdiv(m, block), a_row.device, graph)
    f = torch.empty(b, h, m, m, dtype=torch.float32, device=a_row.device)  # (B, H, M, M)
    a_full = a_full.contiguous()
    _causal_curvature_kernel[(tile_i.numel(), b * h)](
        a_row.contiguous(), a_full, symmetrized(a_full) if graph == "symmetric" else a_full,
        prefix, d_row.contiguous(),
        d_key.contiguous(), f, tile_i, tile_j, _firsts(first, m, a_row.device),
        m, m * m, m, prefix.stride(0), prefix.stride(1),
        SYMMETRIC=graph == "symmetric", ROWSUM=graph == "rowsum", PRECISION=precision, BT=block,
        BK=max(16, min(block_k, block)), num_warps=4,
    )  # fmt: skip
    return f
