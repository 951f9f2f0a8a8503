"""The CAB mask predictor on the GPU: Q, K -> block selection, in either selection form.

Prompt form: coarsen Q and K (max-L2) -> adjacency A with its degrees -> Forman-Ricci F
on the lower tiles -> fused z-score blend and per-query-block top-k. Only A (bf16 or
float32), F (float32) and the symmetric graph's W (A's dtype), M x M per head, cross
launches; everything else stays on chip. Causal form: a second adjacency sweep forms
each block's row as its first row sees it, and the curvature takes prefix degrees
(:func:`attnlab.kernels.curvature.causal_forman_ricci`). On an H200 at 128k tokens, 32
heads, head dim 128, 64-token blocks, the scored selection (a float32 adjacency) takes
25.2 ms in the prompt form and 22.9 in the causal one, against 39.9 and 52.2 in PyTorch,
a bf16 adjacency (another selection) 6.1 (benchmarks_ref/kernels_forms_h200.csv).

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

from collections.abc import Callable

import torch
import triton

from attnlab.kernels import reference
from attnlab.kernels.adjacency import adjacency_and_degrees
from attnlab.kernels.coarsen import coarsen_max_l2
from attnlab.kernels.curvature import causal_forman_ricci, forman_ricci_from_degrees
from attnlab.kernels.select import BlockSelection, score_and_select

FORMS = ("prompt", "causal")


def cab_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scaling: float,
    keep: torch.Tensor | None,
    *,
    form: str = "prompt",
    query: str = "block",
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
    band_block: int = 16,
    select_warps: int = 4,
    coarsen: Callable[[torch.Tensor, int], torch.Tensor] = coarsen_max_l2,
    first: torch.Tensor | None = None,
    rows: int | None = None,
) -> BlockSelection:
    """Score key blocks with CAB and keep the best ones per query block.

    q: (B, H, N, D), k: (B, Hkv, N, D), the same full causal prefix. keep: (Mg,) int key
    blocks kept per query group, Mg = ceil(M / q_group), M = ceil(N / block_size), or None
    for the scores alone (``write_score``); must_keep: optional (Mg, M) bool (sinks, the
    diagonal), counted toward keep. ``form`` is the selection form (DESIGN): "prompt", each
    query block scored from the whole prompt's coarse graph, whose scores equal
    ``reference.cab_block_scores``; "causal", each query block scored by its first row from
    blocks at or before it (its own block's representatives are that row's query and key,
    degrees are prefix sums over query blocks), whose scores equal
    ``reference.cab_row_scores`` at the blocks' first rows. ``query="row"`` (the
    query-aware variant: the scoring row's own query stands for its block) changes the
    prompt form alone (in the causal form a block's first row is its representative
    either way): each query block is scored by its last row, whose scores equal
    ``reference.cab_row_scores`` there (the causal form's kernels on the last rows, the
    block's own coarse key on the diagonal). Equal up to float32 rounding
    and, on the GPU, tf32 or bf16 in the products; the selection equals
    ``reference.top_blocks_grouped`` on them. Returns a ``BlockSelection`` with the lists,
    the mask and the scores asked for. ``precision="bf16"`` stores A in bf16 and
    multiplies it on the tensor cores as it is (the fast setting on a GPU); "tf32" and
    "ieee" keep A in float32. The causal form's curvature tiles are ``curvature_block / 2``
    (it reads two graphs per tile), as are the query-aware prompt form's (the causal
    form's kernels). ``coarsen``: the max-L2 coarsening, (B, H, N, D) -> (B, H, M, D), the
    Triton kernel by default (see :func:`cab_scores`). ``first`` (M,) int: the first key
    block each query block can keep (a sliding window's edge): the curvature's tiles left
    of every band skip their product and hold values no selection may read, so the
    scores count only on each block's band, and only with ``lam = 1`` (a z-score is
    affine per row, so the order on the band stays; a blend's would not).
    There the prompt form's curvature tiles are ``band_block`` (with ``query="block"``):
    a narrow band (33 blocks under Gemma 3's window in 16-token blocks) leaves fewer
    products outside it in small tiles (a row's product runs over every k either way; the
    same terms, summed in steps of ``block_k``, so F on the bands up to rounding). The
    causal form keeps its tiles: its adjacency's strips fit inside them, and smaller
    strips would sum the prefix degrees in another order.
    ``rows``: with ``lam = 0`` (coarse magnitude, whose query block's scores are its own
    row of A alone, in either form) only the first ``rows`` query blocks are scored (the
    score alone: ``keep`` None, ``write_score`` alone): their queries alone are coarsened
    (or with ``query="row"`` taken at their last rows) and multiplied (one strip of
    ``adjacency_blocks[0]`` rows at least: their scores then equal the whole grid's bit
    for bit), the later rows of the score stay -inf;
    None: every query block.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if query not in ("block", "row"):
        raise ValueError(f"query must be 'block' or 'row', got {query!r}")
    if first is not None and lam != 1.0:
        raise ValueError("first (band-only curvature) needs lam = 1")
    if rows is not None:
        if lam != 0.0 or keep is not None or write_mask or write_indices:
            raise ValueError(
                "rows (the first query blocks scored alone) needs lam = 0 and the score alone"
            )
        # a row of A reads its own block's queries alone; one strip of rows at least, so
        # that the products tile (and round) as the whole grid's, bit for bit
        q = q[:, :, : max(rows, adjacency_blocks[0], 1) * block_size]
    kc = coarsen(k, block_size)  # (B, Hkv, M, D)
    a_dtype = torch.bfloat16 if precision == "bf16" and q.is_cuda else torch.float32
    sweep = dict(
        precision=precision, a_dtype=a_dtype, block_n=adjacency_blocks[1],
        num_warps=adjacency_warps,
    )  # fmt: skip
    if form == "prompt" and query == "block":
        tile = curvature_block if first is None else band_block  # a window's: band tiles
        a, d_out, d_in = adjacency_and_degrees(
            coarsen(q, block_size), kc, scaling, adjacency, fill_upper=False,
            block_m=adjacency_blocks[0], align=max(tile, curvature_block), **sweep,
        )  # (B, H, M, M), (B, H, M), (B, H, M)  # fmt: skip
        f = None
        if lam != 0.0:
            f = forman_ricci_from_degrees(a, d_out, d_in, graph, precision, tile, first=first)
    else:
        a, f = _causal_graph(
            q, k, kc, block_size, scaling, lam, adjacency, graph, adjacency_blocks[0],
            curvature_block // 2, sweep, coarsen, first, last=form == "prompt",
        )  # fmt: skip
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


def _causal_graph(
    q, k, kc, block_size, scaling, lam, adjacency, graph, block_m, tile, sweep, coarsen, firsts,
    *, last=False,
):  # fmt: skip
    """The causal form's coarse rows A_row (B, H, M, M) (query block b's row as its first
    row sees it, or with ``last`` its last row, that row's own query against the block's
    coarse key: the query-aware prompt form) and their curvature F, or None with lam = 0;
    ``firsts``: each query block's first key block, or None (``first`` of
    :func:`cab_select`)."""
    m = kc.shape[2]
    tile = max(16, min(tile, triton.next_power_of_2(m)))
    block_m = max(16, min(block_m, tile))  # strips inside tiles: the tiles' prefix sums
    if last:
        n = q.shape[2]
        ends = (torch.arange(0, n, block_size, device=q.device) + block_size - 1).clamp(max=n - 1)
        q_row, kd = q.index_select(2, ends), None
    else:  # each block's first row: its query and key
        q_row, kd = q[:, :, ::block_size], k[:, :, ::block_size]
    a_row, d_row, _ = adjacency_and_degrees(
        q_row, kc, scaling, adjacency, fill_upper=False, block_m=block_m, align=tile, kd=kd,
        **sweep,
    )  # fmt: skip
    if lam == 0.0:
        return a_row, None
    a_full, d_full, strips = adjacency_and_degrees(
        coarsen(q, block_size), kc, scaling, adjacency, fill_upper=False,
        block_m=block_m, align=tile, per_strip=True, **sweep,
    )  # fmt: skip
    # the column sums of the complete blocks' rows before each tile, from the strips'
    per = tile // block_m
    done = strips.cumsum(1)[:, per - 1 :: per]  # (B * H, tiles, M): rows before tile t + 1
    prefix = torch.nn.functional.pad(done, (0, 0, 1, 0))[:, : triton.cdiv(m, tile)]
    f = causal_forman_ricci(
        a_row, a_full, d_row, d_full, prefix.contiguous(), graph, sweep["precision"], tile,
        first=firsts,
    )  # fmt: skip
    return a_row, f


def cab_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scaling: float,
    form: str,
    *,
    query: str = "block",
    lam: float = 1.0,
    adjacency: str = "softmax",
    graph: str = "symmetric",
    first: torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """CAB's block scores in selection ``form`` from the Triton kernels, no selection:
    (B, H, M, M) float32, -inf beyond each query block (see :func:`cab_select`). The
    scoring path's predictor on the GPU: float32 A and products, and the
    blocks' representatives chosen by the reference's own coarsening, so that the scores
    are the reference's up to summation order. (The coarsening kernel sums each token's
    squares in its own order, and where norms nearly tie, as under a QK-norm, another
    token could stand for the block.) ``first``: each query block's
    first key block; the scores then count on the bands alone; ``rows``: coarse
    magnitude's first query blocks scored alone (see :func:`cab_select`)."""
    return cab_select(
        q, k, block_size, scaling, None, form=form, query=query, lam=lam, adjacency=adjacency,
        graph=graph, write_score=True, write_mask=False, write_indices=False,
        precision="ieee", coarsen=reference.coarsen_max_l2, first=first, rows=rows,
    ).score  # fmt: skip
