"""The CAB mask predictor on the GPU: Q, K -> block selection.

coarsen Q and K (max-L2) -> adjacency A with its degrees -> Forman-Ricci F on the lower
tiles -> fused z-score blend and per-query-block top-k. Only A (bf16 or float32) and F
(float32), M x M per head, cross launches, each written and read once; everything else
stays on chip. On the H100 at 128k tokens, 32 heads, block 64 the whole predictor takes
1.8 ms (precision="bf16"): coarsening 0.74 (reading Q and K, at the memory's speed),
adjacency 0.25, curvature 0.34, score and top-k 0.53.

Granularity. Scores are formed between 64-token blocks (M = N / 64). The selection is made
per query block of ``q_group`` score rows, pooling their scores by max, over 64-token key
blocks. With q_group = 2 the FlexAttention BlockMask is 128 x 64, which is the H100's
default flex tile for D = 128 in bf16 (BLOCK_M = 128, BLOCK_N = 64): every kept block is
whole tiles, only the diagonal needs the mask, and no 64-row tile configuration is forced.
A 64 x 64 BlockMask only compiles with BLOCK_M = 64 and then ran 7.3 ms at 1.1% density
against 5.35 ms for 128 x 128 at 1.2% (issue 9); 128-token key blocks would halve the
precision of the selection where it matters, in which distant keys are kept.
"""

from __future__ import annotations

import torch

from attnlab.kernels.coarsen import coarsen_max_l2
from attnlab.kernels.curvature import adjacency_and_degrees, forman_ricci_from_degrees
from attnlab.kernels.select import BlockSelection, score_and_select


def cab_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scaling: float,
    keep: torch.Tensor,
    *,
    lam: float = 1.0,
    adjacency: str = "softmax",
    graph: str = "symmetric",
    must_keep: torch.Tensor | None = None,
    q_group: int = 1,
    write_score: bool = False,
    write_mask: bool = False,
    write_indices: bool = True,
    precision: str = "tf32",
    adjacency_blocks: tuple[int, int] = (64, 64),
    adjacency_warps: int = 4,
    curvature_block: int = 128,
    select_warps: int = 4,
) -> BlockSelection:
    """Score key blocks with CAB and keep the best ones per query block.

    q: (B, H, N, D), k: (B, Hkv, N, D), the same full causal prefix. keep: (Mg,) int key
    blocks kept per query group, Mg = ceil(M / q_group), M = ceil(N / block_size);
    must_keep: optional (Mg, M) bool (sinks, the diagonal), counted toward keep.
    The scores equal ``reference.cab_block_scores`` (up to float32 rounding and, on the
    GPU, tf32 in A @ A) and the selection equals ``reference.top_blocks_grouped`` on
    them. Returns a ``BlockSelection`` with the lists, the mask and the scores asked for.
    ``precision="bf16"`` stores A in bf16 and multiplies it on the tensor cores as it is
    (the fast setting on a GPU); "tf32" and "ieee" keep A in float32.
    """
    qc = coarsen_max_l2(q, block_size)  # (B, H, M, D)
    kc = coarsen_max_l2(k, block_size)  # (B, Hkv, M, D)
    a_dtype = torch.bfloat16 if precision == "bf16" and q.is_cuda else torch.float32
    a, d_out, d_in = adjacency_and_degrees(
        qc,
        kc,
        scaling,
        adjacency,
        fill_upper=False,
        precision=precision,
        a_dtype=a_dtype,
        block_m=adjacency_blocks[0],
        block_n=adjacency_blocks[1],
        align=curvature_block,
        num_warps=adjacency_warps,
    )  # (B, H, M, M), (B, H, M), (B, H, M)
    f = None
    if lam != 0.0:
        f = forman_ricci_from_degrees(a, d_out, d_in, graph, precision, curvature_block)
    return score_and_select(
        f if f is not None else a,
        keep,
        a=a,
        lam=lam,
        must_keep=must_keep,
        q_group=q_group,
        write_score=write_score,
        write_mask=write_mask,
        write_indices=write_indices,
        num_warps=select_warps,
    )
