"""The Triton curvature kernels equal their PyTorch references.

On a machine without a GPU the kernels run in Triton's interpreter, which must be switched
on before the kernel modules are first imported; shapes stay tiny because the interpreter
runs every program in Python. With TRITON_INTERPRET=0 and a GPU the same tests run on it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from attnlab.kernels import reference as ref  # noqa: E402
from attnlab.kernels.adjacency import coarse_adjacency  # noqa: E402
from attnlab.kernels.cab import cab_select  # noqa: E402
from attnlab.kernels.coarsen import coarsen_max_l2  # noqa: E402
from attnlab.kernels.curvature import forman_ricci  # noqa: E402
from attnlab.kernels.select import (  # noqa: E402
    score_and_select,
    top_blocks,
    top_blocks_grouped,
)

ON_GPU = os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# float32 throughout on the CPU; on the GPU the kernels' default tf32 A @ A is looser
F_TOL = dict(rtol=2e-2, atol=2e-2) if ON_GPU else dict(rtol=1e-5, atol=1e-5)


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _causal(m):
    return torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril()


@pytest.mark.parametrize("n, block_size", [(64, 16), (45, 8), (7, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coarsen_picks_the_largest_norm_token_of_each_block(n, block_size, dtype):
    x = _rand(2, 3, n, 12, seed=n, dtype=dtype)
    assert torch.equal(coarsen_max_l2(x, block_size), ref.coarsen_max_l2(x, block_size))


def test_coarsen_ties_go_to_the_earliest_token():
    x = _rand(1, 1, 16, 4, seed=1)
    x[0, 0, 9] = x[0, 0, 3] = 10.0  # block 0 (tokens 0..7) ties on 3, block 1 on 9 alone
    x[0, 0, 12] = 10.0  # block 1 ties 9 and 12
    out = coarsen_max_l2(x, 8)
    assert torch.equal(out[0, 0, 0], x[0, 0, 3]) and torch.equal(out[0, 0, 1], x[0, 0, 9])
    assert torch.equal(out, ref.coarsen_max_l2(x, 8))


def test_coarsen_reads_strided_inputs():
    x = _rand(1, 20, 2, 8, seed=2).transpose(1, 2)  # (B, H, N, D) view of a (B, N, H, D) tensor
    assert torch.equal(coarsen_max_l2(x, 4), ref.coarsen_max_l2(x, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_norms_kernel_sums_each_tokens_squares(dtype):
    """The norms by which the scoring path's coarsening ranks tokens on CUDA: a strided
    input, a head dim that is not a power of two, a ragged last tile of tokens."""
    from attnlab.kernels.coarsen import squared_norms

    x = _rand(2, 70, 3, 40, seed=4, dtype=dtype).transpose(1, 2)  # (B, H, N, D) view
    out = squared_norms(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 70)
    # two float32 sums of 40 positive terms in any order: each within 39 roundings
    torch.testing.assert_close(out, x.float().pow(2).sum(-1), rtol=2 * 40 * 2.0**-24, atol=0)


def test_reference_coarsens_an_expanded_key_head_once():
    """One key head expanded to four query heads (a view, as a fused prefill passes it):
    the representatives of a contiguous copy, themselves a view of one head's."""
    k = _rand(2, 1, 45, 12, seed=3, dtype=torch.bfloat16)
    out = ref.coarsen_max_l2(k.expand(2, 4, 45, 12), 8)
    assert torch.equal(out, ref.coarsen_max_l2(k.expand(2, 4, 45, 12).contiguous(), 8))
    assert out.shape == (2, 4, 6, 12) and out.stride(1) == 0


@pytest.mark.parametrize("adjacency", ["softmax", "scores", "dot"])
@pytest.mark.parametrize("q_offset, mq", [(0, 9), (3, 6)])
def test_adjacency_matches_reference_with_gqa(adjacency, q_offset, mq):
    qc = _rand(1, 4, mq, 16, seed=3)
    kc = _rand(1, 2, 9, 16, seed=4)  # two query heads per key head
    a = coarse_adjacency(qc, kc, 0.25, adjacency, q_offset)
    torch.testing.assert_close(a, ref.coarse_adjacency(qc, kc, 0.25, adjacency, q_offset), **F_TOL)


@pytest.mark.parametrize("graph", ["directed", "symmetric", "rowsum"])
@pytest.mark.parametrize("m", [5, 21])
def test_forman_ricci_matches_reference(graph, m):
    qc = _rand(1, 2, m, 8, seed=m)
    a = ref.coarse_adjacency(qc, qc, 0.5, "softmax")
    torch.testing.assert_close(forman_ricci(a, graph), ref.forman_ricci(a, graph), **F_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetrized_reads_the_strict_lower_triangle_alone(dtype):
    from attnlab.kernels.curvature import symmetrized

    m = 70  # not a multiple of the kernel's tiles
    a = _rand(2, 3, m, m, seed=5).to(dtype)
    below = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril(-1)
    low = a.masked_fill(~below, 0.0)
    w = symmetrized(a.masked_fill(~below, float("nan")))  # the diagonal and above unread
    assert w.dtype == dtype and torch.equal(w, 0.5 * (low + low.mT))
    # heads before batch in memory (a strided view): the same W
    assert torch.equal(symmetrized(a.transpose(0, 1).contiguous().transpose(0, 1)), w)


@pytest.mark.parametrize("block_k", [16, 32, 64])
@pytest.mark.parametrize("m", [40, 48, 64])
def test_symmetric_curvature_in_k_steps_past_its_tiles_matches_reference(block_k, m):
    """The symmetric tile's k runs over all of M, so its step may exceed the tile (a
    window's band tiles of 16 blocks): M = 40 leaves ragged tiles (masked loads), M = 48
    whole tiles but ragged steps of 32 or 64 (shortened to whole ones), M = 64 whole
    ones (unmasked)."""
    from attnlab.kernels.curvature import forman_ricci_from_degrees

    qc = _rand(1, 2, m, 8, seed=7)
    a = ref.coarse_adjacency(qc, qc, 0.5, "softmax")
    f = forman_ricci_from_degrees(a, a.sum(-1), a.sum(-2), "symmetric", block=16, block_k=block_k)
    lower = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(f[..., lower], ref.forman_ricci(a, "symmetric")[..., lower], **F_TOL)


def _forman_by_definition(a, graph):
    """F(i, j) = 4 w_ij - deg(i) - deg(j) + 3 sum_k w_ik w_kj, by loops over a small graph."""
    m = len(a)
    if graph == "symmetric":
        w = [[0.0 if i == j else (a[i][j] + a[j][i]) / 2 for j in range(m)] for i in range(m)]
        deg_i = deg_j = [sum(w[i]) for i in range(m)]
    else:
        w = a
        deg_i = [sum(w[i][k] for k in range(m)) for i in range(m)]  # out-degree
        deg_j = [sum(w[k][j] for k in range(m)) for j in range(m)]  # in-degree
    ww = [[sum(w[i][k] * w[k][j] for k in range(m)) for j in range(m)] for i in range(m)]
    return [[4 * w[i][j] - deg_i[i] - deg_j[j] + 3 * ww[i][j] for j in range(m)] for i in range(m)]


@pytest.mark.parametrize("graph", ["directed", "symmetric"])
def test_forman_ricci_of_a_small_graph_follows_the_definition(graph):
    # a path 0 - 1 - 2 with a bridge 2 - 3 to a pendant, and self-loops on the diagonal
    a = [
        [1.0, 0.0, 0.0, 0.0],
        [0.6, 0.4, 0.0, 0.0],
        [0.1, 0.7, 0.2, 0.0],
        [0.0, 0.0, 0.9, 0.1],
    ]
    expected = torch.tensor(_forman_by_definition(a, graph), device=DEVICE)
    f = forman_ricci(torch.tensor(a, device=DEVICE)[None, None], graph)[0, 0]
    torch.testing.assert_close(f, expected, **F_TOL)


@pytest.mark.parametrize("graph", ["directed", "symmetric"])
def test_curvature_tiles_cover_the_lower_triangle_once_longest_loop_first(graph):
    """Each graph's launch order holds every lower tile once, its longest k-loops first:
    i - j for the directed graph (k from j to i), the row for the symmetric one (every k,
    or every k up to i in the causal form)."""
    from attnlab.kernels.curvature import _lower_tiles

    ti, tj = (t.tolist() for t in _lower_tiles(7, torch.device("cpu"), graph))
    pairs = list(zip(ti, tj, strict=True))
    assert sorted(pairs) == [(i, j) for i in range(7) for j in range(i + 1)]
    loop = [i - j if graph == "directed" else i for i, j in pairs]
    assert loop == sorted(loop, reverse=True)
    if graph == "symmetric":  # a row's tiles from its diagonal leftwards (a window's first)
        assert pairs[:3] == [(6, 6), (6, 5), (6, 4)]


def _scores(m, seed):
    s = _rand(1, 2, m, m, seed=seed)
    s[..., 4] = s[..., 2]  # ties between key blocks
    return s.masked_fill(~_causal(m), float("-inf"))


@pytest.mark.parametrize("with_must_keep", [False, True])
def test_select_blocks_matches_reference_with_ties(with_must_keep):
    m = 13
    s = _scores(m, seed=5)
    keep = torch.tensor([0, 1, 2, 3, 3, 4, 20, 2, 5, 0, 6, 1, 13], device=DEVICE)
    must = None
    if with_must_keep:
        must = torch.eye(m, dtype=torch.bool, device=DEVICE)
        must[:, 0] = True
    assert torch.equal(top_blocks(s, keep, must), ref.top_blocks(s, keep, must))


@pytest.mark.parametrize("q_group", [1, 2, 3])
def test_grouped_selection_pools_query_rows_by_max(q_group):
    m = 11
    s = _scores(m, seed=6)
    mg = -(-m // q_group)
    keep = torch.arange(mg, device=DEVICE) % 4 + 1
    must = torch.zeros(mg, m, dtype=torch.bool, device=DEVICE)
    must[:, 0] = True
    out = top_blocks_grouped(s, keep, q_group, must)
    assert torch.equal(out, ref.top_blocks_grouped(s, keep, q_group, must))
    if q_group == 1:
        assert torch.equal(out, ref.top_blocks(s, keep, must))


def _dense_from_lists(sel):
    b, h, mg, m = sel.full_idx.shape
    dense = torch.zeros(b, h, mg, m, dtype=torch.bool)
    for num, idx in ((sel.full_num, sel.full_idx), (sel.partial_num, sel.partial_idx)):
        for bi in range(b):
            for hi in range(h):
                for g in range(mg):
                    kept = idx[bi, hi, g, : num[bi, hi, g]].long().cpu()
                    assert torch.all(kept[1:] > kept[:-1]), "block lists must ascend"
                    dense[bi, hi, g, kept] = True
    return dense.to(sel.mask.device)


@pytest.mark.parametrize(
    "lam, adjacency, graph",
    [(1.0, "softmax", "directed"), (0.5, "scores", "symmetric"), (0.0, "softmax", "directed"),
     (1.0, "dot", "rowsum")],  # the research plan's formula (cab_plan)
)  # fmt: skip
def test_cab_select_matches_reference_scores_and_selection(lam, adjacency, graph):
    n, block_size, q_group = 83, 8, 2  # ragged last block, odd number of blocks
    q = _rand(1, 2, n, 16, seed=7)
    k = _rand(1, 1, n, 16, seed=8)  # GQA
    m = -(-n // block_size)
    mg = -(-m // q_group)
    keep = torch.full((mg,), 3, device=DEVICE)
    must = torch.zeros(mg, m, dtype=torch.bool, device=DEVICE)
    must[:, 0] = True
    sel = cab_select(
        q,
        k,
        block_size,
        0.25,
        keep,
        lam=lam,
        adjacency=adjacency,
        graph=graph,
        must_keep=must,
        q_group=q_group,
        write_score=True,
        write_mask=True,
    )
    expected = ref.cab_block_scores(q, k, block_size, 0.25, lam, adjacency, graph)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(sel.score), finite)
    torch.testing.assert_close(sel.score[finite], expected[finite], **F_TOL)
    # the selection is exact on the kernel's own scores
    assert torch.equal(sel.mask, ref.top_blocks_grouped(sel.score, keep, q_group, must))
    assert torch.equal(_dense_from_lists(sel), sel.mask)
    for g in range(mg):  # partial blocks are the ones that reach the diagonal
        part = sel.partial_idx[0, 0, g, : sel.partial_num[0, 0, g]]
        assert bool((part >= g * q_group).all())


def test_cab_select_with_tiles_smaller_than_the_graph():
    # strips of 16 rows zero-fill only up to the 32-wide curvature tile: exercise that edge
    n, block_size = 150, 4
    q = _rand(1, 1, n, 16, seed=9)
    k = _rand(1, 1, n, 16, seed=10)
    m = -(-n // block_size)
    sel = cab_select(
        q, k, block_size, 0.25, torch.full((m,), 7, device=DEVICE), write_score=True,
        write_mask=True, write_indices=False, adjacency_blocks=(16, 16), curvature_block=32,
    )  # fmt: skip
    expected = ref.cab_block_scores(q, k, block_size, 0.25)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(sel.score[finite], expected[finite], **F_TOL)
    assert torch.equal(sel.mask, ref.top_blocks(sel.score, torch.full((m,), 7, device=DEVICE)))


def test_fused_select_launched_in_bands_by_row_length():
    m, q_group = 37, 2  # groups of 2 rows in bands of 16, 32 and 64 columns
    qc = _rand(1, 2, m, 8, seed=11)
    a = ref.coarse_adjacency(qc, qc, 0.5, "softmax")
    f = ref.forman_ricci(a)
    mg = -(-m // q_group)
    keep = torch.arange(mg, device=DEVICE) % 5 + 2
    must = torch.zeros(mg, m, dtype=torch.bool, device=DEVICE)
    must[:, 0] = True
    sel = score_and_select(
        f, keep, a=a, lam=0.5, must_keep=must, q_group=q_group, write_score=True,
        write_mask=True, write_indices=True, band_floor=16,
    )  # fmt: skip
    expected = ref.cab_block_scores(qc, qc, 1, 0.5, lam=0.5)  # block 1: qc is its own coarsening
    torch.testing.assert_close(sel.score, expected, **F_TOL)
    assert torch.equal(sel.mask, ref.top_blocks_grouped(sel.score, keep, q_group, must))
    assert torch.equal(_dense_from_lists(sel), sel.mask)


def _edge_gaps(score: torch.Tensor, keep: torch.Tensor, must: torch.Tensor) -> torch.Tensor:
    """Per (head, query block), the gap between the last kept and the first dropped score
    (must-keep blocks first); +inf where the scores decide nothing (the budget takes every
    causal block, or the edge is a must-keep or an unseen block). A selection is exact
    only where this is not a near-tie. Returns (B, H, M)."""
    ranked = score.masked_fill(must, float("inf")).sort(-1, descending=True).values
    m = ranked.shape[-1]
    rows = torch.arange(m, device=ranked.device)
    idx = keep.long().clamp(max=m - 1)
    gap = ranked[..., rows, idx - 1] - ranked[..., rows, idx]
    return gap.masked_fill(~((keep < rows + 1) & torch.isfinite(gap)), float("inf"))


@pytest.mark.parametrize(
    "lam, graph, sparsity, n",
    [(1.0, "symmetric", 0.75, 256), (0.5, "directed", 0.5, 256), (0.0, "symmetric", 0.9, 640)],
)
def test_cab_select_keeps_the_selection_the_prefill_regime_scores(lam, graph, sparsity, n):
    """The Triton predictor at the scored budgets (bench.budgets) selects, block for block,
    what CAB's prompt form selects where its accuracy is scored (SparseRun.block_selection:
    whole-prompt curvature, each query block under its last row's budget, block 0 and its
    own block kept), with GQA."""
    from attnlab import policies, sparse
    from attnlab.bench.budgets import must_keep_mask, scored_blocks_per_query_block
    from attnlab.blocks import expand_kv

    bs, scaling = 16, 0.25
    q, k = _rand(1, 2, n, 16, seed=21), _rand(1, 1, n, 16, seed=22)
    policy = policies.make("cab", block_size=bs, lam=lam, graph=graph, selection="prompt")
    run = sparse.SparseRun(policy, sparsity, whole_prompt=True)
    scored = run.block_mask(0, q, expand_kv(k, 2), scaling, kv_heads=1)
    m = n // bs
    keep = scored_blocks_per_query_block(n, bs, sparsity).to(DEVICE)
    must = must_keep_mask(m, 1, 1).to(DEVICE)
    sel = cab_select(
        q, k, bs, scaling, keep, lam=lam, graph=graph, must_keep=must, write_score=True,
        write_mask=True, precision="ieee",
    )  # fmt: skip
    assert _edge_gaps(sel.score, keep, must).min() > 1e-3  # not decided by rounding
    assert torch.equal(sel.mask, scored)
    assert bool((scored.sum(-1) >= keep).all())  # every block spends its budget


def test_kernel_benchmark_times_the_scored_selection():
    """``attnlab bench kernels`` times CAB at the selections the prefill regime scores, in
    both forms: its rows say which, and the density each times is that of SparseRun's
    selection in that form on the same Q and K."""
    from attnlab import policies, sparse
    from attnlab.bench import kernels as kb
    from attnlab.bench.budgets import must_keep_mask, scored_blocks_per_query_block
    from attnlab.blocks import causal_block_pairs

    n, s = 256, 0.75
    cfg = kb.cpu_variant()
    cfg.heads = cfg.kv_heads = 2
    cfg.head_dim, cfg.block_size, cfg.sparsities = 16, 16, (s,)
    cfg.rep_ms, cfg.min_reps, cfg.methods = 1.0, 1, ("cab_flex", "cab_causal_flex")
    rows = kb._bench_length(cfg, n, "cpu", torch.Generator().manual_seed(0), print)
    assert [(r["method"], r["selection"]) for r in rows] == [
        ("cab_flex_s75", "prompt"),
        ("cab_causal_flex_s75", "causal"),
    ]

    gen = torch.Generator().manual_seed(0)  # the benchmark's Q and K
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
    m, scaling = n // 16, cfg.head_dim**-0.5
    budget = scored_blocks_per_query_block(n, 16, s)
    kept = {}
    for row in rows:
        form = row["selection"]
        policy = policies.make("cab", block_size=16, selection=form, lam=cfg.lam,
                               adjacency=cfg.adjacency, graph=cfg.graph)  # fmt: skip
        run = sparse.SparseRun(policy, s, whole_prompt=True)
        kept[form] = run.block_mask(0, q, k, scaling)
        pairs = (kept[form] * causal_block_pairs(n, 16)).sum().item()
        assert row["density"] == pytest.approx(pairs / (2 * n * (n + 1) / 2), rel=1e-12)
        # the benchmark's predictor in this form selects those very blocks
        sel = kb._torch_selection(q, k, cfg, budget, must_keep_mask(m, 1, 1), scaling, form)
        assert torch.equal(sel.mask, kept[form])
    assert not torch.equal(kept["prompt"], kept["causal"])  # the forms differ here


@pytest.mark.parametrize("form", ["prompt", "causal"])
def test_cab_select_keeps_the_scored_selection_on_a_real_prompt(smollm2, form):
    """The same equality on a real model's Q and K, in both selection forms: SmolLM2 (GQA,
    9 query heads over 3) on a 512-token passkey prompt, layer 10 after RoPE. Real scores
    can nearly tie at a budget's edge; the query blocks whose kept and dropped scores are
    1e-3 or more apart (float noise is below 1e-5) must match exactly, and they must be
    most of them."""
    from attnlab import hooks, niah, policies, sparse
    from attnlab.bench.budgets import must_keep_mask, scored_blocks_per_query_block
    from attnlab.blocks import expand_kv

    model, tok, _ = smollm2
    prompt = niah.make_prompt(tok, 512, 0.5, 0, seed=0)
    store = {}

    def keep(layer, q, k, q_rot, k_rot):
        if layer == 10:
            store["qk"] = (q_rot.float(), k_rot.float())

    with torch.no_grad(), hooks.at_rope(model, after=keep):
        model(torch.tensor([prompt.input_ids]))
    q, k = (t.to(DEVICE) for t in store["qk"])
    h, bs, s = q.shape[1], 16, 0.9
    scaling = q.shape[-1] ** -0.5
    run = sparse.SparseRun(policies.make("cab", selection=form), s, whole_prompt=True)
    scored = run.block_mask(10, q, expand_kv(k, h), scaling, kv_heads=k.shape[1])
    m = 512 // bs
    budget = scored_blocks_per_query_block(512, bs, s).to(DEVICE)
    must = must_keep_mask(m, 1, 1).to(DEVICE)
    sel = cab_select(q, k, bs, scaling, budget, form=form, must_keep=must, write_score=True,
                     write_mask=True, precision="ieee")  # fmt: skip
    clear = _edge_gaps(sel.score, budget, must) > 1e-3  # (1, H, M): no tie to break
    assert clear.float().mean() > 0.8
    assert torch.equal(sel.mask[clear], scored[clear])
