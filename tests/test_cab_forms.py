"""CAB's Triton predictor in both selection forms (DESIGN: Selection forms) equals the
PyTorch scoring path, and the fused prefill's selection takes it: ``causal`` (each query
block scored by its first row, degrees over blocks at or before it) and ``prompt`` (the
whole prompt's coarse graph). The interpreter on the CPU, compiled with
TRITON_INTERPRET=0 on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from attnlab import policies, sparse  # noqa: E402
from attnlab.blocks import expand_kv  # noqa: E402
from attnlab.kernels import reference as ref  # noqa: E402
from attnlab.kernels.cab import cab_select  # noqa: E402

ON_GPU = os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# z-scores of float32 curvature: a row whose few entries nearly tie amplifies the
# summation order's rounding (1e-7 relative) by |F| / std; 1e-3 is far above that here
Z_TOL = dict(rtol=1e-4, atol=1e-3)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize(
    "lam, adjacency, graph, n, bs, tile, strip",
    [
        (1.0, "softmax", "symmetric", 83, 8, 128, 64),  # ragged last block, one tile
        (1.0, "softmax", "directed", 150, 4, 32, 64),  # 38 blocks: tiles of 16, their prefix
        (0.5, "scores", "symmetric", 300, 4, 64, 64),  # 75 blocks in tiles of 32
        (0.3, "scores", "directed", 300, 4, 64, 64),
        (0.0, "softmax", "symmetric", 83, 8, 128, 64),  # coarse magnitude: no curvature
        (1.0, "softmax", "symmetric", 600, 4, 128, 16),  # 4 strips of 16 rows per tile
        (1.0, "softmax", "directed", 600, 4, 128, 8),  # strips of 8 asked: 16 (the least)
        (1.0, "dot", "rowsum", 150, 4, 32, 64),  # the research plan's formula (cab_plan)
    ],
)
def test_causal_form_scores_equal_the_first_rows_scores(lam, adjacency, graph, n, bs, tile, strip):
    """The causal form's scores are ``reference.cab_row_scores`` at each block's first row
    (GQA, the last block ragged, several adjacency strips per curvature tile), and its
    selection and lists are exact on them."""
    q, k = _rand(1, 2, n, 16, seed=1), _rand(1, 1, n, 16, seed=2)
    m, q_group = -(-n // bs), 2
    mg = -(-m // q_group)
    keep = torch.arange(mg, device=DEVICE) % 4 + 2
    must = torch.zeros(mg, m, dtype=torch.bool, device=DEVICE)
    must[:, 0] = True
    sel = cab_select(
        q, k, bs, 0.25, keep, form="causal", lam=lam, adjacency=adjacency, graph=graph,
        must_keep=must, q_group=q_group, write_score=True, write_mask=True, precision="ieee",
        curvature_block=tile, adjacency_blocks=(strip, 64),
    )  # fmt: skip
    starts = torch.arange(0, n, bs, device=DEVICE)
    expected = ref.cab_row_scores(q, k, starts, bs, 0.25, lam, adjacency, graph)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(sel.score), finite)
    torch.testing.assert_close(sel.score[finite], expected[finite], **Z_TOL)
    assert torch.equal(sel.mask, ref.top_blocks_grouped(sel.score, keep, q_group, must))
    for g in range(mg):  # the lists hold the mask's blocks, the partial ones reaching the diagonal
        for num, idx in ((sel.full_num, sel.full_idx), (sel.partial_num, sel.partial_idx)):
            kept = idx[0, 1, g, : num[0, 1, g]]
            assert bool(sel.mask[0, 1, g, kept.long()].all())
        assert int(sel.full_num[0, 1, g] + sel.partial_num[0, 1, g]) == int(sel.mask[0, 1, g].sum())


@pytest.mark.parametrize(
    "lam, adjacency, graph, n, bs, tile", [(1.0, "softmax", "symmetric", 83, 8, 128),
                                           (1.0, "dot", "rowsum", 150, 4, 32),
                                           (0.5, "scores", "directed", 83, 8, 64)],
)  # fmt: skip
def test_the_query_aware_prompt_form_scores_equal_the_last_rows_scores(
    lam, adjacency, graph, n, bs, tile
):
    """``query="row"`` in the prompt form: each query block's scores are
    ``reference.cab_row_scores`` at its last row with that row's own query (GQA, the last
    block ragged, a blend with A); in the causal form the first row is its block's
    representative either way, so the query-aware scores are CAB's own."""
    q, k = _rand(1, 2, n, 16, seed=15), _rand(1, 1, n, 16, seed=16)
    starts = torch.arange(0, n, bs, device=DEVICE)
    kw = dict(lam=lam, adjacency=adjacency, graph=graph, write_score=True, write_indices=False)
    kw |= dict(precision="ieee", curvature_block=tile, coarsen=ref.coarsen_max_l2)
    got = cab_select(q, k, bs, 0.25, None, form="prompt", query="row", **kw).score
    ends = (starts + bs - 1).clamp(max=n - 1)
    expected = ref.cab_row_scores(q, k, ends, bs, 0.25, lam, adjacency, graph, "row")
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], expected[finite], **Z_TOL)
    whole = ref.cab_block_scores(q, k, bs, 0.25, lam, adjacency, graph)
    assert not torch.allclose(got[finite], whole[finite], **Z_TOL)  # not the block's form
    causal = cab_select(q, k, bs, 0.25, None, form="causal", query="row", **kw).score
    own = cab_select(q, k, bs, 0.25, None, form="causal", **kw).score
    assert torch.equal(causal, own)
    with pytest.raises(ValueError, match="query"):
        cab_select(q, k, bs, 0.25, None, query="rows", **kw)


def test_a_causal_first_row_reads_no_later_token():
    """Changing the tokens after a block's first row leaves that block's causal scores
    unchanged (the prompt form's change: it reads the whole prompt)."""
    n, bs = 96, 8
    q, k = _rand(1, 2, n, 16, seed=3), _rand(1, 1, n, 16, seed=4)
    q2, k2 = q.clone(), k.clone()
    q2[..., 41:, :] += 1.0  # after block 5's first row (token 40)
    k2[..., 41:, :] -= 1.0
    kw = dict(write_score=True, write_mask=False, write_indices=False, precision="ieee")
    for form, same in (("causal", True), ("prompt", False)):
        a, b = (
            cab_select(x, y, bs, 0.25, None, form=form, **kw).score for x, y in ((q, k), (q2, k2))
        )
        assert torch.equal(a[..., :6, :], b[..., :6, :]) == same


def _clear_edges(score: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per (head, query block), the gap between the lowest kept and the highest dropped
    finite score (a budget keeps a prefix of the ranking): where it is wide, float
    rounding cannot change the selection. (B, H, M)."""
    finite = torch.isfinite(score)
    low = score.masked_fill(~(kept & finite), torch.inf).amin(-1)
    high = score.masked_fill(kept | ~finite, -torch.inf).amax(-1)
    return low - high


def _gemma_qk(layer: int = 2):
    """A QK-norm model's Q and K (tiny Gemma 3, random weights, 200 tokens, after RoPE):
    every token's norm nearly equal, so that max-L2 coarsening decides between near
    ties; layer 2 is its global one."""
    from tests.tiny_models import tiny_gemma3

    from attnlab import hooks

    model = tiny_gemma3()
    ids = torch.randint(300, 5000, (1, 200), generator=torch.Generator().manual_seed(2))
    store = {}

    def keep(i, q, k, q_rot, k_rot):
        if i == layer:
            store["qk"] = (q_rot.float().to(DEVICE), k_rot.float().to(DEVICE))

    with torch.no_grad(), hooks.at_rope(model, after=keep):
        model(ids, use_cache=False)
    return store["qk"]


@pytest.mark.parametrize("form", ["causal", "prompt"])
@pytest.mark.parametrize("name", ["cab", "coarse_magnitude"])
@pytest.mark.parametrize("graph, inputs", [("symmetric", "random"), ("directed", "random"),
                                           ("symmetric", "qk_norm")])  # fmt: skip
def test_the_fused_prefill_scores_cab_with_the_kernels_and_selects_the_same(
    name, form, graph, inputs, monkeypatch
):
    """A block policy's fused prefill selection (``lists``: the budget kernel's path)
    scores CAB with the Triton kernels and keeps the blocks the PyTorch path keeps
    wherever rounding cannot decide (GQA, ragged last block, 90% sparsity); on a QK-norm
    model's near-tied norms, the very blocks (its representatives are the reference's)."""
    policy = policies.make(name, block_size=16, graph=graph, selection=form)
    _fused_keeps_the_pytorch_selection(policy, form, inputs, monkeypatch)


@pytest.mark.parametrize("form", ["causal", "prompt"])
@pytest.mark.parametrize(
    "params", [dict(query="row"), dict(adjacency="dot", graph="rowsum")]
)  # cab_query, cab_plan
def test_the_fused_prefill_scores_cabs_variants_with_the_kernels(params, form, monkeypatch):
    """The query-aware variant and the research plan's formula: the same on the fused
    path as on the PyTorch one."""
    policy = policies.make("cab", block_size=16, selection=form, **params)
    _fused_keeps_the_pytorch_selection(policy, form, "random", monkeypatch)


def _fused_keeps_the_pytorch_selection(policy, form, inputs, monkeypatch):
    import attnlab.kernels.cab as cab_kernels

    calls = []
    real = cab_kernels.cab_scores
    monkeypatch.setattr(
        cab_kernels, "cab_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    bs, scaling = policy.block_size, 0.25
    if inputs == "random":
        n, kv = 200, 2
        q, k = _rand(1, 4, n, 16, seed=5), _rand(1, kv, n, 16, seed=6)
    else:
        q, k = _gemma_qk()
        n, kv = q.shape[-2], k.shape[1]
    k = expand_kv(k, 4)
    keeps, scores = {}, {}
    for fused in (False, True):
        run = sparse.SparseRun(policy, 0.9, whole_prompt=True)
        keep = run.block_mask(0, q, k, scaling, kv_heads=kv, lists=False if fused else None)
        keeps[fused] = keep[0] if fused else keep
        fresh = sparse.SparseRun(policy, 0.9, whole_prompt=True)  # no layer history yet
        ctx = fresh._context(0, q, k, None, scaling, kv, rows=run_rows(n), cache={})
        ctx.triton = fused
        starts = torch.arange(0, n, bs, device=DEVICE)
        rows = starts if form == "causal" else (starts + bs - 1).clamp(max=n - 1)
        scores[fused] = policy.block_scores(ctx, rows, form)
    assert len(calls) == 2  # the fused selection and the fused scores above
    finite = torch.isfinite(scores[False]) & (scores[False] < torch.inf)
    assert torch.equal(torch.isfinite(scores[True]), torch.isfinite(scores[False]))
    torch.testing.assert_close(scores[True][finite], scores[False][finite], **Z_TOL)
    clear = _clear_edges(scores[False], keeps[False]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(keeps[True][clear], keeps[False][clear])


def run_rows(n):
    from attnlab.masks import causal_rows

    return lambda index: causal_rows(index, n)


def test_the_kernels_score_only_the_variants_they_form():
    """The fused path's predicate: CAB's own query and graphs, a whole prefill; the others
    (and any later call, or the path without lists) keep the PyTorch scores."""
    n, bs = 64, 16
    q, k = _rand(1, 2, n, 16, seed=7), _rand(1, 2, n, 16, seed=8)
    run = sparse.SparseRun(policies.make("cab"), 0.9, whole_prompt=True)
    ctx = run._context(0, q, k, None, 0.25, 2, rows=run_rows(n), cache={})
    rows = torch.arange(0, n, bs, device=DEVICE)

    def takes(ctx=ctx, **params):
        return policies.make("cab", block_size=bs, **params).triton_scores(ctx, rows)

    assert not takes()  # ctx.triton is off: the keep-mask path
    ctx.triton = True
    assert takes() and takes(graph="directed") and takes(lam=0.0, graph="rowsum")
    assert takes(query="row") and takes(adjacency="dot", graph="rowsum")  # cab_query, cab_plan
    assert not takes(magnitude="quest", lam=0.5)
    rows24 = torch.arange(0, n, 24, device=DEVICE)  # one per block of 24: not a power of 2
    assert not policies.make("cab", block_size=24).triton_scores(ctx, rows24)
    assert policies.make("cab", block_size=32).triton_scores(ctx, rows[::2])
    ctx.history.q = q  # a later call: earlier rows in the history
    assert not takes()


@pytest.mark.parametrize("graph", ["symmetric", "directed", "rowsum"])
def test_band_first_blocks_leave_the_bands_curvature_unchanged(graph):
    """``first``: the curvature kernels skip the product only in tiles left of every band
    of their rows, so each query block's entries from its first key block on equal the
    whole computation's, in both forms (a 40-block window; the prompt form's tiles of 64
    whole and of 16 under the window, ``band_block``; the causal form's of 32)."""
    n, bs = 1200, 8
    q, k = _rand(1, 1, n, 16, seed=11), _rand(1, 1, n, 16, seed=12)  # one head: interpreted kernels
    m = n // bs
    first = (torch.arange(m, device=DEVICE) - 39).clamp(min=0)
    band = (torch.arange(m, device=DEVICE) >= first[:, None]) & (
        torch.arange(m, device=DEVICE) <= torch.arange(m, device=DEVICE)[:, None]
    )
    kw = dict(graph=graph, write_score=True, write_indices=False, precision="ieee")
    for form in ("prompt", "causal"):
        kw["curvature_block"] = 64  # the causal form's tiles: 32; the prompt form's: 16 (band)
        whole = cab_select(q, k, bs, 0.25, None, form=form, **kw).score
        part = cab_select(q, k, bs, 0.25, None, form=form, first=first, band_block=16, **kw)
        part = part.score
        # z-scores per row: affine, so the band keeps its order (the values move with
        # the row's mean and spread, which the skipped tiles change; rounding may tie two
        # of them, never swap them)
        for row in range(40, m):
            w, p = (s[..., row, band[row]] for s in (whole, part))
            order = w.argsort(dim=-1)
            w, p = w.gather(-1, order), p.gather(-1, order)
            rising = w[..., 1:] > w[..., :-1]
            assert bool((p[..., 1:] >= p[..., :-1])[rising].all()), (form, row)
    with pytest.raises(ValueError, match="lam = 1"):
        cab_select(q, k, bs, 0.25, None, lam=0.5, first=first, **kw)


@pytest.mark.parametrize("form", ["prompt", "causal"])
@pytest.mark.parametrize("adjacency", ["softmax", "scores"])
def test_coarse_magnitude_scores_the_first_rows_alone(form, adjacency):
    """``rows`` (lam = 0: a query block's scores are its own row of A): the first rows'
    scores equal the whole computation's bit for bit (on a GPU too: one strip of the
    adjacency's rows at least, tiled as the whole grid's), the later rows are -inf,
    whatever the count (none, one, all, past the last; a ragged last block)."""
    n, bs = 700, 8  # 88 blocks, the last of 4 tokens
    q, k = _rand(1, 1, n, 16, seed=13), _rand(1, 1, n, 16, seed=14)
    m = -(-n // bs)
    kw = dict(form=form, lam=0.0, adjacency=adjacency, write_score=True, write_indices=False)
    kw["adjacency_blocks"] = (16, 64)  # strips of 16 rows
    whole = cab_select(q, k, bs, 0.25, None, **kw).score
    for rows in (0, 1, 17, m - 1, m, m + 3):
        part = cab_select(q, k, bs, 0.25, None, rows=rows, **kw).score
        r = min(max(rows, 16), m)  # one strip of rows at least
        assert torch.equal(part[..., :r, :], whole[..., :r, :]), rows
        assert bool((part[..., r:, :] == -torch.inf).all()), rows
    with pytest.raises(ValueError, match="lam = 0"):
        cab_select(q, k, bs, 0.25, None, form=form, lam=0.5, rows=3, write_score=True)
    with pytest.raises(ValueError, match="lam = 0"):
        cab_select(q, k, bs, 0.25, torch.ones(m, dtype=torch.int32), form=form, lam=0.0, rows=3)


@pytest.mark.parametrize("graph, form", [("symmetric", "prompt"), ("directed", "causal")])
def test_under_a_window_the_fused_cab_selection_keeps_the_pytorch_one(graph, form, monkeypatch):
    """Under a sliding window the fused selection hands CAB's curvature each block's
    first visible key block and keeps the blocks the PyTorch path keeps wherever
    rounding cannot decide."""
    from tests.test_windows import _recipe

    import attnlab.kernels.cab as cab_kernels
    from attnlab.masks import ModelMask

    firsts = []
    real = cab_kernels.cab_scores
    monkeypatch.setattr(
        cab_kernels, "cab_scores", lambda *a, **kw: firsts.append(kw["first"]) or real(*a, **kw)
    )
    n, bs, w, scaling = 2400, 8, 100, 0.25  # 300 blocks: tiles of 128 and 64 skipped
    # one head (the keys' heads expanded to the queries' are tested above, 4 of 1 and 2)
    q, k = _rand(1, 1, n, 16, seed=13), _rand(1, 1, n, 16, seed=14)
    policy = policies.make("cab", block_size=bs, graph=graph, selection=form)
    keeps = {}
    for fused in (False, True):
        mask = ModelMask(_recipe(n, w, device=torch.device(DEVICE)))
        run = sparse.SparseRun(policy, 0.97, whole_prompt=True)  # a few of a band's blocks
        keep = run.block_mask(0, q, k, scaling, 1, mask, lists=fused or None)
        keeps[fused] = keep[0] if fused else keep
    (first,) = firsts
    starts = torch.arange(0, n, bs, device=DEVICE)
    assert torch.equal(first.cpu(), ((starts.cpu() - w + 1).clamp(min=0) // bs).int())
    ctx = sparse.SparseRun(policy, 0.97, whole_prompt=True)._context(
        0, q, k, None, scaling, 1, rows=run_rows(n), cache={}
    )
    rows = starts if form == "causal" else (starts + bs - 1).clamp(max=n - 1)
    score = policy.block_scores(ctx, rows, form)
    seen = mask.block_counts(starts, (starts + bs - 1).clamp(max=n - 1), bs) > 0
    clear = _clear_edges(score.masked_fill(~seen, -torch.inf), keeps[False]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(keeps[True][clear], keeps[False][clear])
