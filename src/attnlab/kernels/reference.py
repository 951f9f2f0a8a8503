"""Plain-PyTorch reference of the curvature-masking pipeline.

These functions define what the Triton kernels compute; the CAB policy on the CPU runs
them directly. Shapes use B batch, H query heads, Hkv key/value heads, N tokens,
D head dim, M = ceil(N / block_size) blocks.

The pipeline: max-L2 coarsening of Q and K -> coarse adjacency A between blocks ->
Forman-Ricci curvature F of the coarse graph -> per query block, a score per key block
that blends z(-F) and z(A) -> top key blocks under the budget.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def n_blocks(n: int, block_size: int) -> int:
    return math.ceil(n / block_size)


def coarsen_max_l2(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Represent each block of ``block_size`` tokens by its token of largest L2 norm.

    x: (B, H, N, D). Returns (B, H, M, D); the last block may be ragged. Ties go to the
    earliest token of the block.
    """
    b, h, n, d = x.shape
    m = n_blocks(n, block_size)
    pad = m * block_size - n
    norms = x.float().pow(2).sum(-1)  # (B, H, N)
    if pad:
        norms = torch.nn.functional.pad(norms, (0, pad), value=-1.0)
    idx = norms.view(b, h, m, block_size).argmax(-1)  # (B, H, M) first max wins
    idx = idx + torch.arange(m, device=x.device) * block_size
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(b, h, m, d))


def expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: (B, Hkv, ., D) -> (B, H, ., D)."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def coarse_adjacency(
    qc: torch.Tensor,
    kc: torch.Tensor,
    scaling: float,
    adjacency: str = "softmax",
    q_offset: int = 0,
) -> torch.Tensor:
    """Coarse attention graph between blocks.

    qc: (B, H, Mq, D) coarse queries of blocks q_offset .. q_offset + Mq - 1;
    kc: (B, H or Hkv, Mk, D) coarse keys. Returns A: (B, H, Mq, Mk) float32, zero outside
    the block-causal region (key block <= query block). ``adjacency`` is "softmax"
    (row-normalised coarse attention) or "scores" (raw scaled dot products, shifted so the
    smallest causal entry of each row is 0, which keeps weights non-negative).
    """
    kc = expand_kv(kc, qc.shape[1])
    s = torch.einsum("bhid,bhjd->bhij", qc.float(), kc.float()) * scaling  # (B, H, Mq, Mk)
    mq, mk = s.shape[-2:]
    qi = torch.arange(mq, device=s.device).unsqueeze(-1) + q_offset
    causal = torch.arange(mk, device=s.device).unsqueeze(0) <= qi  # (Mq, Mk)
    if adjacency == "softmax":
        a = torch.softmax(s.masked_fill(~causal, NEG_INF), dim=-1)
    elif adjacency == "scores":
        low = s.masked_fill(~causal, float("inf")).amin(-1, keepdim=True)
        a = s - low
    else:
        raise ValueError(f"adjacency must be 'softmax' or 'scores', got {adjacency!r}")
    return a.masked_fill(~causal, 0.0)


def forman_ricci(a: torch.Tensor, graph: str = "directed") -> torch.Tensor:
    """Forman-Ricci curvature of every edge of the weighted coarse graph.

    a: (B, H, M, M) square adjacency (all blocks as queries and keys).
    F = 4 A - D_i - D_j + 3 (A @ A). ``graph="directed"`` uses the out-degree of i and
    the in-degree of j; ``graph="symmetric"`` first forms W = (A + A^T) / 2 with the
    diagonal dropped and uses its degrees. Returns F: (B, H, M, M) float32; only the
    block-causal entries are meaningful to callers.
    """
    a = a.float()
    if graph == "symmetric":
        a = 0.5 * (a + a.transpose(-1, -2))
        a = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
        d_out = d_in = a.sum(-1)
    elif graph == "directed":
        d_out, d_in = a.sum(-1), a.sum(-2)
    else:
        raise ValueError(f"graph must be 'directed' or 'symmetric', got {graph!r}")
    return 4.0 * a - d_out.unsqueeze(-1) - d_in.unsqueeze(-2) + 3.0 * (a @ a)


def causal_zscore(x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """z-score each row over its causal entries; non-causal entries come back as 0.

    x: (..., Mq, Mk); causal: (Mq, Mk) bool. A row of constant values scores 0.
    """
    cnt = causal.sum(-1, keepdim=True).clamp(min=1)
    xm = x.masked_fill(~causal, 0.0)
    mean = xm.sum(-1, keepdim=True) / cnt
    var = ((x - mean).masked_fill(~causal, 0.0) ** 2).sum(-1, keepdim=True) / cnt
    z = (x - mean) / var.sqrt().clamp(min=1e-6)
    return z.masked_fill(~causal, 0.0)


def cab_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scaling: float,
    lam: float = 1.0,
    adjacency: str = "softmax",
    graph: str = "directed",
) -> torch.Tensor:
    """CAB's key-block score for every query block.

    q: (B, H, N, D), k: (B, Hkv, N, D) with the same N (a full causal prefix).
    Returns (B, H, M, M) float32: lam * z(-F) + (1 - lam) * z(A), z taken per query block
    over its causal key blocks; -inf outside the block-causal region.
    """
    qc = coarsen_max_l2(q, block_size)  # (B, H, M, D)
    kc = coarsen_max_l2(k, block_size)  # (B, Hkv, M, D)
    a = coarse_adjacency(qc, kc, scaling, adjacency)  # (B, H, M, M)
    m = a.shape[-1]
    causal = torch.ones(m, m, dtype=torch.bool, device=a.device).tril()
    score = (1.0 - lam) * causal_zscore(a, causal)
    if lam:
        score = score + lam * causal_zscore(-forman_ricci(a, graph), causal)
    return score.masked_fill(~causal, NEG_INF)


def select_blocks(
    score: torch.Tensor, keep: torch.Tensor, must_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep, per query block, its ``keep[i]`` best causal key blocks.

    score: (B, H, M, M) with -inf outside the block-causal region; keep: (M,) int blocks
    per query block (clamped to the causal count); must_keep: optional (M, M) bool of
    blocks kept whatever their score (they count toward ``keep``).
    Returns a (B, H, M, M) bool block mask.
    """
    m = score.shape[-1]
    if must_keep is not None:
        score = score.masked_fill(must_keep, float("inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)  # (B, H, M, M)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=score.device).expand_as(order))
    causal_count = torch.arange(1, m + 1, device=score.device)
    k = torch.minimum(keep.to(score.device), causal_count).unsqueeze(-1)  # (M, 1)
    mask = (rank < k) & (score > NEG_INF)
    if must_keep is not None:
        mask |= must_keep
    return mask


def select_blocks_grouped(
    score: torch.Tensor,
    keep: torch.Tensor,
    q_group: int,
    must_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``select_blocks`` for query blocks of ``q_group`` score rows, pooled by max.

    score: (B, H, M, M) with -inf where not allowed; keep: (Mg,) key blocks per query
    group, Mg = ceil(M / q_group), clamped to the group's causal count; must_keep:
    optional (Mg, M) bool. Returns a (B, H, Mg, M) bool mask over key blocks. With
    q_group = 1 this is ``select_blocks``. The GPU path selects this way so that its
    FlexAttention tiles can be taller (query) than wide (key).
    """
    b, h, m, _ = score.shape
    mg = n_blocks(m, q_group)
    pad = mg * q_group - m
    if pad:
        score = torch.nn.functional.pad(score, (0, 0, 0, pad), value=NEG_INF)
    pooled = score.view(b, h, mg, q_group, m).amax(3)  # (B, H, Mg, M)
    if must_keep is not None:
        pooled = pooled.masked_fill(must_keep, float("inf"))
    order = pooled.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=score.device).expand_as(order))
    causal_count = ((torch.arange(mg, device=score.device) + 1) * q_group).clamp(max=m)
    k = torch.minimum(keep.to(score.device), causal_count).unsqueeze(-1)  # (Mg, 1)
    mask = (rank < k) & (pooled > NEG_INF)
    if must_keep is not None:
        mask |= must_keep
    return mask
