"""Plain-PyTorch reference of the curvature-masking pipeline.

These functions define what the Triton kernels compute; the CAB policy on the CPU runs
them directly. Shapes use B batch, H query heads, Hkv key/value heads, N tokens,
D head dim, M = ceil(N / block_size) blocks.

The pipeline: max-L2 coarsening of Q and K -> coarse adjacency A between blocks ->
Forman-Ricci curvature F of the coarse graph -> per query block, a score per key block
that blends z(-F) and z(A) -> top key blocks under the budget.
"""

from __future__ import annotations

import torch

from attnlab.blocks import expand_kv, n_blocks

NEG_INF = float("-inf")
ADJACENCIES = ("softmax", "scores", "dot")
GRAPHS = ("symmetric", "directed", "rowsum")


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Each token's squared L2 norm in float32, x (B, H, N, D) -> (B, H, N): the order by
    which max-L2 coarsening ranks a block's tokens. PyTorch's ``x.float().pow(2).sum(-1)``
    off CUDA (and without Triton); on CUDA one Triton kernel
    (:func:`attnlab.kernels.coarsen.squared_norms`: one pass over x, where PyTorch's makes
    three over a float32 copy). Each sums in its own order, as PyTorch's own sums do on
    different devices: where two tokens' norms tie up to rounding, the device decides
    which stands for the block (a bf16 or fp16 value's square is exact in float32; only
    the sum rounds)."""
    if x.is_cuda:
        try:  # Triton is the ``gpu`` extra
            from attnlab.kernels.coarsen import squared_norms as on_gpu
        except ImportError:
            pass
        else:
            return on_gpu(x)
    return x.float().pow(2).sum(-1)


def coarsen_max_l2(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Represent each block of ``block_size`` tokens by its token of largest L2 norm.

    x: (B, H, N, D). Returns (B, H, M, D); the last block may be ragged. Ties go to the
    earliest token of the block.
    """
    b, h, n, d = x.shape
    m = n_blocks(n, block_size)
    if h > 1 and x.stride(1) == 0:  # one key head expanded to the query heads (a view):
        # its representatives once, the same view of them (no float32 copy per head)
        return coarsen_max_l2(x[:, :1], block_size).expand(b, h, m, d)
    pad = m * block_size - n
    norms = squared_norms(x)  # (B, H, N)
    if pad:
        norms = torch.nn.functional.pad(norms, (0, pad), value=-1.0)
    idx = norms.view(b, h, m, block_size).argmax(-1)  # (B, H, M) first max wins
    idx = idx + torch.arange(m, device=x.device) * block_size
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(b, h, m, d))


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
    (row-normalised coarse attention), "scores" (raw scaled dot products, shifted so the
    smallest causal entry of each row is 0, which keeps weights non-negative) or "dot"
    (A = Q_c K_c^T as the research plan writes it: neither scaled nor shifted).
    """
    kc = expand_kv(kc, qc.shape[1])
    s = torch.einsum("bhid,bhjd->bhij", qc.float(), kc.float())  # (B, H, Mq, Mk)
    mq, mk = s.shape[-2:]
    qi = torch.arange(mq, device=s.device).unsqueeze(-1) + q_offset
    causal = torch.arange(mk, device=s.device).unsqueeze(0) <= qi  # (Mq, Mk)
    return adjacency_from_logits(s, causal, scaling, adjacency)


def adjacency_from_logits(
    s: torch.Tensor, causal: torch.Tensor, scaling: float, adjacency: str
) -> torch.Tensor:
    """Coarse graph weights from unscaled coarse dot products ``s`` (..., Mq, Mk) over the
    ``causal`` entries (broadcastable bool); zero elsewhere. See :func:`coarse_adjacency`."""
    if adjacency == "softmax":
        a = torch.softmax((s * scaling).masked_fill(~causal, NEG_INF), dim=-1)
    elif adjacency == "scores":
        a = s * scaling
        a = a - a.masked_fill(~causal, float("inf")).amin(-1, keepdim=True)
    elif adjacency == "dot":
        a = s
    else:
        raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    return a.masked_fill(~causal, 0.0)


def forman_ricci(a: torch.Tensor, graph: str = "symmetric") -> torch.Tensor:
    """Forman-Ricci curvature of every edge of the weighted coarse graph.

    a: (B, H, M, M) square adjacency (all blocks as queries and keys).
    F = 4 A - D_i - D_j + 3 (A @ A). ``graph="symmetric"`` (the default, DESIGN: the one
    whose barbell bridge is most negative in block-causal form) first forms
    W = (A + A^T) / 2 with the diagonal dropped and uses its degrees; ``"directed"`` uses
    the out-degree of i and the in-degree of j; ``"rowsum"`` (the research plan's formula)
    the row sums of A at both ends. Returns F: (B, H, M, M) float32; only the
    block-causal entries are meaningful to callers.
    """
    a = a.float()
    if graph == "symmetric":
        a = 0.5 * (a + a.transpose(-1, -2))
        a = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
        d_out = d_in = a.sum(-1)
    elif graph == "directed":
        d_out, d_in = a.sum(-1), a.sum(-2)
    elif graph == "rowsum":
        d_out = d_in = a.sum(-1)
    else:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
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
    graph: str = "symmetric",
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


def top_blocks(
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


def top_blocks_grouped(
    score: torch.Tensor,
    keep: torch.Tensor,
    q_group: int,
    must_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``top_blocks`` for query blocks of ``q_group`` score rows, pooled by max.

    score: (B, H, M, M) with -inf where not allowed; keep: (Mg,) key blocks per query
    group, Mg = ceil(M / q_group), clamped to the group's causal count; must_keep:
    optional (Mg, M) bool. Returns a (B, H, Mg, M) bool mask over key blocks. With
    q_group = 1 this is ``top_blocks``. The GPU path selects this way so that its
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


def prefix_max_l2_index(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """For every token t, the index of its block's representative as of t: the token of
    largest L2 norm among the block's tokens up to t (the earliest on ties, as in
    :func:`coarsen_max_l2`). x: (B, H, N, D) -> (B, H, N) long absolute indices. At a
    block's last token this is the block's full representative; before it, it never
    looks at a later token, which keeps per-row scores causal.
    """
    b, h, n, _ = x.shape
    m = n_blocks(n, block_size)
    pad = m * block_size - n
    norms = squared_norms(x)  # (B, H, N)
    if pad:
        norms = torch.nn.functional.pad(norms, (0, pad), value=-1.0)
    norms = norms.view(b, h, m, block_size)
    run_max = norms.cummax(-1).values
    prev = torch.nn.functional.pad(run_max[..., :-1], (1, 0), value=NEG_INF)
    offset = torch.arange(block_size, device=x.device)
    new_max = torch.where(norms > prev, offset, -1)  # a strictly larger norm starts here
    idx = new_max.cummax(-1).values + (torch.arange(m, device=x.device) * block_size)[:, None]
    return idx.view(b, h, m * block_size)[..., :n]


def cab_row_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scaling: float,
    lam: float = 1.0,
    adjacency: str = "softmax",
    graph: str = "symmetric",
    query: str = "block",
) -> torch.Tensor:
    """CAB's key-block scores for the query rows at ``q_pos``, each from tokens at or
    before it alone (the causal form of :func:`cab_block_scores`).

    q: (B, H, N, D) every query row from position 0; k: (B, Hkv, N, D) the keys of the
    same positions; q_pos: (Tq,) rows to score. Row t in block b = t // block_size sees the
    coarse graph on blocks 0..b: blocks before b complete (max-L2 representatives, their
    rows of A as in :func:`coarse_adjacency`), block b as it stands at t (query and key
    representatives among its tokens up to t, :func:`prefix_max_l2_index`). With
    ``query="row"`` (the query-aware variant) row t's own query stands for block b in the
    coarse row it is scored by, instead of the block's representative. Curvature of the
    edge b -> j: symmetric, F = 4 W_bj - D(b) - D(j) + 3 (W W)_bj on W = (A + A^T) / 2
    with self-loops dropped, degrees of W over blocks 0..b; directed, the same on A with
    D_out(b) the row's out-degree and D_in(j) the in-degree of key block j from query
    blocks 0..b (a prefix sum, never a later block's); rowsum, on A with the row sums of
    b and of j. At the last row of a prompt whose length is a multiple of ``block_size``
    this equals the last row of :func:`cab_block_scores` (with ``query="block"``).
    Returns (B, H, Tq, M) float32, -inf beyond block b.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if query not in ("block", "row"):
        raise ValueError(f"query must be 'block' or 'row', got {query!r}")
    h = q.shape[1]
    kx = expand_kv(k, h)  # (B, H, N, D)
    a_full = coarse_adjacency(
        coarsen_max_l2(q, block_size), coarsen_max_l2(kx, block_size), scaling, adjacency
    )  # (B, H, M, M): rows of complete blocks are what row t reads of it
    m = a_full.shape[-1]
    bt = torch.div(q_pos, block_size, rounding_mode="floor")  # (Tq,) the row's block
    blocks = torch.arange(m, device=q.device)
    causal = blocks <= bt[:, None]  # (Tq, M)
    own = blocks == bt[:, None]
    d = q.shape[-1]
    if query == "row":
        q_rep = q[:, :, q_pos].float()  # (B, H, Tq, D)
    else:
        qi = prefix_max_l2_index(q, block_size)[..., q_pos]  # (B, H, Tq)
        q_rep = q.gather(2, qi.unsqueeze(-1).expand(-1, -1, -1, d)).float()
    ki = prefix_max_l2_index(kx, block_size)[..., q_pos]
    k_rep = kx.gather(2, ki.unsqueeze(-1).expand(-1, -1, -1, d)).float()
    kc = coarsen_max_l2(kx, block_size).float()  # (B, H, M, D)
    s = torch.einsum("bhtd,bhjd->bhtj", q_rep, kc)  # (B, H, Tq, M)
    s = torch.where(own, (q_rep * k_rep).sum(-1, keepdim=True), s)
    a = adjacency_from_logits(s, causal, scaling, adjacency)  # the row's own coarse row
    done = torch.cumsum(a_full, dim=-2) - a_full  # (B, H, M, M): sum over query blocks < b
    before = done[:, :, bt, :]  # (B, H, Tq, M)
    a_own = (a * own).sum(-1, keepdim=True)  # (B, H, Tq, 1) weight on the own block
    a_past = a.masked_fill(own, 0.0)  # weights on complete blocks
    if graph == "symmetric":
        diag = torch.diagonal(a_full, dim1=-2, dim2=-1)  # (B, H, M)
        w_full = 0.5 * (a_full + a_full.transpose(-1, -2))
        w_full = w_full - torch.diag_embed(torch.diagonal(w_full, dim1=-2, dim2=-1))
        w_row = 0.5 * a_past  # W_bj for j < b
        d_own = w_row.sum(-1, keepdim=True)  # degree of block b
        # degree of j < b: its complete row and column inside blocks 0..b-1, plus W_bj
        d_key = (a_full.sum(-1) - 2.0 * diag).unsqueeze(-2) + before + a_past
        d_key = 0.5 * d_key
        f = 4.0 * w_row - d_own - d_key + 3.0 * (w_row @ w_full)
        f_own = -2.0 * d_own + 3.0 * (w_row * w_row).sum(-1, keepdim=True)
        f = torch.where(own, f_own, f)
    else:
        two_hop = a_past @ a_full + a_own * a  # (A A)_bj through complete blocks and b itself
        d_row = a.sum(-1, keepdim=True)  # out-degree (row sum) of block b
        if graph == "directed":
            d_key = before + a  # in-degree of j from query blocks 0..b
        else:  # rowsum: j's own row sum (complete for j < b, the row's own for j = b)
            d_key = torch.where(own, d_row, a_full.sum(-1).unsqueeze(-2))
        f = 4.0 * a - d_row - d_key + 3.0 * two_hop
    score = (1.0 - lam) * causal_zscore(a, causal)
    if lam:
        score = score + lam * causal_zscore(-f, causal)
    return score.masked_fill(~causal, NEG_INF)
