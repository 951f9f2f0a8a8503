"""Selection under a budget and each policy's choice, on hand-made cases with known answers."""

import pytest
import torch

from attnlab import policies
from attnlab.errors import UserError
from attnlab.kernels.reference import coarse_adjacency, coarsen_max_l2, forman_ricci
from attnlab.policies.base import LayerHistory, ScoreContext, keep_mask, row_budget
from attnlab.policies.selection import INF, keep_block_tokens_by_budget, select_tokens


def causal(tq, tk):
    q_pos = torch.arange(tk - tq, tk).unsqueeze(-1)
    return (torch.arange(tk) <= q_pos)[None, None]  # (1, 1, Tq, Tk)


def context(q, k, sparsity, history=None, seed=0):
    tq, tk = q.shape[-2], k.shape[-2]
    vis = causal(tq, tk)
    return ScoreContext(
        q=q,
        k=k,
        visible=vis,
        q_pos=torch.arange(tk - tq, tk),
        budget=row_budget(vis.sum(-1), sparsity),
        scaling=q.shape[-1] ** -0.5,
        layer=0,
        seed=seed,
        history=history or LayerHistory(),
    )


def test_row_budget_rounds_and_keeps_at_least_one():
    assert row_budget(torch.tensor([1, 10, 100, 1000]), 0.9).tolist() == [1, 1, 10, 100]
    assert row_budget(torch.tensor([1000]), 0.99).tolist() == [10]


def test_select_tokens_keeps_best_within_budget_and_every_inf():
    score = torch.tensor([[[[5.0, 1.0, 4.0, 3.0, 2.0], [INF, 1.0, INF, INF, 9.0]]]])
    vis = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    vis[..., 4] = False  # the best score of row 1 is not visible
    keep = select_tokens(score, vis, torch.tensor([[[2, 1]]]))
    assert keep[0, 0, 0].tolist() == [True, False, True, False, False]
    assert keep[0, 0, 1].tolist() == [True, False, True, True, False]  # 3 must-keeps > budget 1


def test_select_blocks_fills_budget_in_score_order():
    # One row at position 11 sees 12 keys in blocks of 4: [0-3], [4-7], [8-11].
    vis = causal(1, 12)
    score = torch.tensor([[[[0.0, 2.0, 1.0]]]])
    keep = keep_block_tokens_by_budget(score, vis, torch.tensor([[[8]]]), block_size=4)
    assert keep[0, 0, 0].tolist() == [False] * 4 + [True] * 8
    keep = keep_block_tokens_by_budget(
        score, vis, torch.tensor([[[3]]]), block_size=4
    )  # nothing fits
    assert keep[0, 0, 0].tolist() == [False] * 4 + [True] * 4 + [False] * 4  # best block only
    must = torch.tensor([[[[INF, 2.0, 1.0]]]])
    keep = keep_block_tokens_by_budget(must, vis, torch.tensor([[[4]]]), block_size=4)
    assert keep[0, 0, 0].tolist() == [True] * 4 + [False] * 8


def test_streamingllm_keeps_sinks_and_recent_window():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    keep = keep_mask(policies.make("streamingllm", n_sink=4), context(q, k, 0.9))
    row = keep[0, 1, 99]  # sees 100 keys, budget 10: 4 sinks + the 6 most recent
    assert row.nonzero().flatten().tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]


def test_topk_keeps_largest_scores():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    ctx = context(q, k, 0.75)
    keep = keep_mask(policies.make("topk"), ctx)
    row = ctx.scores[0, 0, 63]
    assert set(keep[0, 0, 63].nonzero().flatten().tolist()) == set(row.topk(16).indices.tolist())


def test_h2o_keeps_the_heavy_hitter_and_never_readmits_a_key():
    # Key 5 aligns with every query: it accumulates the most attention.
    q = torch.ones(1, 1, 40, 4)
    k = torch.zeros(1, 1, 40, 4)
    k[0, 0, 5] = 3.0
    keep = keep_mask(policies.make("h2o", recent_ratio=0.5), context(q, k, 0.5))
    assert keep[0, 0, 5:, 5].all()  # kept from its arrival on
    row = keep[0, 0, 39]  # budget 20: the 10 most recent and 10 heavy hitters
    assert row[30:].all() and int(row.sum()) == 20
    # eviction memory: a key is kept on the rows from its own to the one that drops it
    enters = keep[..., 1:, :] & ~keep[..., :-1, :]  # (1, 1, 39, 40) kept, not kept before
    rows, keys = enters[0, 0].nonzero().unbind(-1)
    assert torch.equal(rows + 1, keys)


def test_h2o_drops_early_keys_for_good_when_the_row_budget_is_small():
    """At 90%, rows before the tenth keep one key: the heavy hitter is dropped on its
    arrival's next row and never comes back (why eviction policies belong in the cache
    regime, where the prompt is dense)."""
    q = torch.ones(1, 1, 40, 4)
    k = torch.zeros(1, 1, 40, 4)
    k[0, 0, 5] = 3.0
    keep = keep_mask(policies.make("h2o", recent_ratio=0.5), context(q, k, 0.9))
    assert keep[0, 0, 5, 5] and not keep[0, 0, 6:, 5].any()


def test_h2o_decode_step_continues_the_prefill_eviction():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    full = keep_mask(policies.make("h2o"), context(q, k, 0.6))
    ctx = context(q[..., :29, :], k[..., :29, :], 0.6)
    prefill = keep_mask(policies.make("h2o"), ctx)
    history = LayerHistory(received=ctx.received_total, kept=prefill[..., -1, :])
    step = keep_mask(policies.make("h2o"), context(q[..., 29:, :], k, 0.6, history))
    assert torch.equal(step[..., 0, :], full[..., 29, :])


def test_forman_ricci_matches_definition_loops():
    torch.manual_seed(3)
    a = torch.rand(1, 1, 5, 5).tril()
    f = forman_ricci(a, "directed")[0, 0]
    m = a[0, 0]
    for i in range(5):
        for j in range(5):
            tri = sum(m[i, x] * m[x, j] for x in range(5))
            want = 4 * m[i, j] - m[i, :].sum() - m[:, j].sum() + 3 * tri
            assert f[i, j].item() == pytest.approx(want.item(), abs=1e-5)


def _barbell_block_causal(n: int) -> torch.Tensor:
    """Two n-cliques joined by one bridge (n - 1, n), in the block-causal form CAB reads:
    each edge once, from the later block (query) to the earlier (key); no self-loops."""
    w = torch.zeros(2 * n, 2 * n)
    for lo in (0, n):
        w[lo : lo + n, lo : lo + n] = 1.0
    w[n, n - 1] = w[n - 1, n] = 1.0
    return (w - torch.eye(2 * n)).tril()


@pytest.mark.parametrize(
    "graph, bridge, lowest_other",
    # DESIGN: the symmetric graph passes; the directed graph and the plan's row sums fail
    [("symmetric", -3.0, -0.25), ("directed", 2.0, -1.0), ("rowsum", -1.0, -3.0)],
)
def test_barbell_bridge_curvature_by_graph(graph, bridge, lowest_other):
    a = _barbell_block_causal(5)
    f = forman_ricci(a[None, None], graph)[0, 0]
    edges = {(i, j) for i, j in a.nonzero().tolist()}
    others = [f[e].item() for e in edges - {(5, 4)}]
    assert f[5, 4].item() == pytest.approx(bridge)
    assert min(others) == pytest.approx(lowest_other)


def test_cabs_default_graph_makes_the_barbell_bridge_the_most_negative_edge():
    """DESIGN's rule for the default graph, held against the policy's own default."""
    a = _barbell_block_causal(5)
    f = forman_ricci(a[None, None], policies.make("cab").graph)[0, 0]
    edges = a.nonzero().tolist()
    assert min(edges, key=lambda e: f[e[0], e[1]].item()) == [5, 4]
    assert sorted(f[i, j].item() for i, j in edges)[1] > f[5, 4].item()


@pytest.mark.parametrize("name,lam", [("cab", 1.0), ("coarse_magnitude", 0.0)])
def test_cab_ranks_blocks_by_curvature_or_magnitude(name, lam):
    torch.manual_seed(4)
    bs, n = 4, 32
    q, k = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    policy = policies.make(name, block_size=bs, keep_diagonal=False, sink_block=False)
    ctx = context(q, k, 0.75)
    score = policy.score(ctx)  # (1, 1, N, M)
    a = coarse_adjacency(coarsen_max_l2(q, bs), coarsen_max_l2(k, bs), ctx.scaling)
    signal = -forman_ricci(a)[0, 0, 7] if lam == 1.0 else a[0, 0, 7]  # last query block
    assert torch.equal(score[0, 0, -1].argsort(descending=True), signal.argsort(descending=True))


def test_cab_keeps_must_keep_blocks():
    torch.manual_seed(5)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    keep = keep_mask(policies.make("cab", block_size=8), context(q, k, 0.99))
    assert keep[..., 63, 0:8].all() and keep[..., 63, 56:64].all()
    assert int(keep[0, 0, 63].sum()) == 16  # the budget (1 key) admits nothing else


def test_random_block_is_seeded_and_same_for_prefill_and_decode():
    torch.manual_seed(6)
    q, k = torch.randn(1, 1, 48, 8), torch.randn(1, 1, 48, 8)
    policy = policies.make("random_block", block_size=8, keep_diagonal=False, sink_block=False)
    a = keep_mask(policy, context(q, k, 0.5, seed=1))
    b = keep_mask(policy, context(q, k, 0.5, seed=1))
    c = keep_mask(policy, context(q, k, 0.5, seed=2))
    step = keep_mask(policy, context(q[..., 47:, :], k, 0.5, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(step[..., 0, :], a[..., 47, :])


def test_unknown_policy_is_a_user_error():
    from attnlab.errors import UserError

    with pytest.raises(UserError, match="unknown policy 'nope'"):
        policies.make("nope")


def test_snapkv_compresses_to_the_window_and_the_keys_it_votes_for_per_kv_group():
    # Two query heads share one key/value head: head 0 looks for key 10, head 1 for key
    # 20. Shared votes make both heads keep both keys (and their pooled neighbours).
    q = torch.zeros(1, 2, 64, 4)
    q[:, 0, :, 0] = 1.0
    q[:, 1, :, 1] = 1.0
    k = torch.zeros(1, 2, 64, 4)
    k[:, :, 10, 0] = 4.0
    k[:, :, 20, 1] = 4.0
    for pooling in ("avgpool", "maxpool"):
        policy = policies.make("snapkv", window=8, kernel=3, pooling=pooling)
        ctx = context(q, k, 0.75)
        ctx.kv_heads = 1
        kept = policy.compress(ctx)  # (1, 2, 64) the cache after the prompt
        assert kept[0, 0, 56:].all()  # the observation window
        assert kept[0, 0, 9:12].all() and kept[0, 0, 19:22].all()  # pooled neighbours too
        assert torch.equal(kept[0, 0], kept[0, 1])  # one selection per KV group
        assert int(kept[0, 0].sum()) == 16  # the budget: 0.25 x 64


def test_snapkv_decode_keeps_the_compressed_cache_and_every_new_key():
    torch.manual_seed(7)
    q, k = torch.randn(1, 1, 43, 8), torch.randn(1, 1, 43, 8)
    policy = policies.make("snapkv", window=4, kernel=3)
    history = LayerHistory()  # the layer's, shared by its prefill and decode steps
    prefill = context(q[..., :40, :], k[..., :40, :], 0.7, history)
    kept = history.kept = policy.compress(prefill)
    assert int(kept.sum()) == 12 and kept[0, 0, 36:].all()
    for t in (40, 41, 42):  # compressed once: nothing more is dropped
        step = keep_mask(policy, context(q[..., t : t + 1, :], k[..., : t + 1, :], 0.7, history))
        assert torch.equal(step[0, 0, 0, :40], kept[0, 0, :40]) and step[0, 0, 0, 40:].all()
        history.kept = step[..., -1, :]


def test_quest_bound_is_an_upper_bound_and_tight_for_one_token_pages():
    from attnlab.policies.quest import page_bounds, upper_bound

    torch.manual_seed(8)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 37, 16)
    kmin, kmax = page_bounds(k, 8)
    bound = upper_bound(q, kmin, kmax)  # (1, 2, 5, 5 pages)
    dots = (q @ k.transpose(-1, -2)).float()
    for p in range(5):
        assert (bound[..., p] >= dots[..., p * 8 : (p + 1) * 8].amax(-1) - 1e-5).all()
    ones = upper_bound(q, *page_bounds(k, 1))
    assert torch.allclose(ones, dots, atol=1e-5)


def test_quest_keeps_the_page_whose_keys_align_with_the_query():
    q = torch.zeros(1, 1, 64, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 64, 4)
    k[0, 0, 21, 0] = 5.0  # page 2 (keys 16..23) holds the key the query wants
    keep = keep_mask(policies.make("quest", block_size=8), context(q, k, 0.75))
    row = keep[0, 0, 63]
    assert row[16:24].all() and row[56:64].all()  # that page and the query's own
    assert int(row.sum()) == 16


def test_xattention_antidiagonals_and_threshold():
    from attnlab.policies.xattention import antidiagonal_scores

    torch.manual_seed(9)
    q, k = torch.randn(1, 1, 8, 3), torch.randn(1, 1, 8, 3)
    est = antidiagonal_scores(q, k, 4)  # (1, 1, 2, 2)
    dots = q[0, 0] @ k[0, 0].T
    want = sum(dots[4 + 3 - s, 0 + s] for s in range(4))  # tile (1, 0)
    assert est[0, 0, 1, 0].item() == pytest.approx(want.item(), abs=1e-5)
    # Key block 1 (of 4-token blocks) takes nearly all attention: with threshold 0.9 it
    # alone (with the diagonal and block 0, kept as released) is kept, however large the
    # budget.
    q = torch.ones(1, 1, 32, 4)
    k = torch.zeros(1, 1, 32, 4)
    k[0, 0, 4:8] = 6.0
    policy = policies.make("xattention", block_size=4, stride=2, threshold=0.9)
    keep = keep_mask(policy, context(q, k, 0.1))
    row = keep[0, 0, 31]
    assert row[:8].all() and row[28:32].all() and int(row.sum()) == 12
    loose = policies.make("xattention", block_size=4, stride=2, threshold=1.0)
    assert int(keep_mask(loose, context(q, k, 0.1))[0, 0, 31].sum()) > 12
    # A sliding window of 8 keys hides that block from row 31: the shares are the
    # visible blocks' (6 and 7, equal here), so both are kept, not the own block alone.
    k[0, 0, 24:32] = 2.0
    ctx = context(q, k, 0.1)
    ctx.visible = ctx.visible & (torch.arange(32) > torch.arange(32)[:, None] - 8)
    row = keep_mask(policy, ctx)[0, 0, 31]
    assert row[24:32].all() and int(row.sum()) == 8


def _row_graph_by_loops(q, k, t, bs, scaling, graph, adjacency="softmax", query="block"):
    """CAB's coarse graph for row t from the definition, one edge at a time: blocks
    0..b complete or as they stand at t, their max-L2 representatives (earliest on
    ties; row t's own query for block b when ``query="row"``), softmax rows (or raw
    dot products, ``adjacency="dot"``) over causal key blocks. Returns (A, F) over
    blocks 0..b."""
    import math

    b = t // bs

    def rep(x, blk):
        rows = list(range(blk * bs, min((blk + 1) * bs, t + 1)))
        norms = [float(x[r].pow(2).sum()) for r in rows]
        return x[rows[norms.index(max(norms))]]

    qc = [rep(q, i) for i in range(b + 1)]
    kc = [rep(k, j) for j in range(b + 1)]
    if query == "row":
        qc[b] = q[t]
    a = [[0.0] * (b + 1) for _ in range(b + 1)]
    for i in range(b + 1):
        dots = [float(qc[i] @ kc[j]) for j in range(i + 1)]
        if adjacency == "dot":
            a[i][: i + 1] = dots
            continue
        logits = [x * scaling for x in dots]
        m = max(logits)
        z = sum(math.exp(x - m) for x in logits)
        for j in range(i + 1):
            a[i][j] = math.exp(logits[j] - m) / z
    n = b + 1
    if graph == "symmetric":
        w = [[0.0 if i == j else (a[i][j] + a[j][i]) / 2 for j in range(n)] for i in range(n)]
        deg = [sum(w[i]) for i in range(n)]
        f = [
            4 * w[b][j] - deg[b] - deg[j] + 3 * sum(w[b][x] * w[x][j] for x in range(n))
            for j in range(n)
        ]
    else:  # out-degree of the query block; in-degree (directed) or row sum of the key block
        d_out = sum(a[b])
        d_in = [sum(a[i][j] for i in range(n)) for j in range(n)]
        d_key = d_in if graph == "directed" else [sum(a[j]) for j in range(n)]
        f = [
            4 * a[b][j] - d_out - d_key[j] + 3 * sum(a[b][x] * a[x][j] for x in range(n))
            for j in range(n)
        ]
    return a[b], f


@pytest.mark.parametrize(
    "graph, adjacency, query",
    [
        ("directed", "softmax", "block"),
        ("symmetric", "softmax", "block"),
        ("rowsum", "dot", "block"),  # the research plan's formula
        ("symmetric", "softmax", "row"),  # query-aware
    ],
)
def test_cab_row_scores_match_a_loop_over_edges_of_the_causal_definition(graph, adjacency, query):
    from attnlab.kernels.reference import cab_row_scores, causal_zscore

    torch.manual_seed(11)
    bs, n = 4, 22  # five complete blocks and a ragged sixth
    q, k = torch.randn(1, 1, n, 6), torch.randn(1, 1, n, 6)
    q[0, 0, 9] = q[0, 0, 8]  # a tie inside a block: the earliest wins
    rows = torch.arange(n)
    for lam in (0.0, 1.0):
        got = cab_row_scores(q, k, rows, bs, 0.4, lam, adjacency, graph, query)[0, 0]
        for t in range(n):
            a, f = _row_graph_by_loops(q[0, 0], k[0, 0], t, bs, 0.4, graph, adjacency, query)
            b = t // bs
            causal = torch.ones(1, b + 1, dtype=torch.bool)
            x = torch.tensor(a)[None] if lam == 0 else -torch.tensor(f)[None]
            want = causal_zscore(x, causal)[0]
            torch.testing.assert_close(got[t, : b + 1], want, rtol=1e-4, atol=1e-4)
            assert torch.isinf(got[t, b + 1 :]).all()


def test_cab_row_scores_of_a_prompts_last_row_equal_the_whole_graph():
    from attnlab.kernels.reference import cab_block_scores, cab_row_scores

    torch.manual_seed(12)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    for graph in ("directed", "symmetric", "rowsum"):
        whole = cab_block_scores(q, k, 8, 0.3, 0.7, "softmax", graph)[..., -1, :]
        last = cab_row_scores(q, k, torch.tensor([31]), 8, 0.3, 0.7, "softmax", graph)[..., 0, :]
        torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-5)


def test_sparq_finds_the_oracles_keys_from_the_querys_largest_channels():
    """Keys that match the query on its two large channels are the oracle's top keys;
    SparQ reading those 2 of 16 channels (1/8) finds them, where the other 14 channels
    carry only noise. With every channel it is the oracle itself."""
    g = torch.Generator().manual_seed(3)
    q = 0.05 * torch.randn(1, 2, 1, 16, generator=g)
    q[..., 0, 3], q[..., 0, 11] = 2.0, -2.0
    k = 0.3 * torch.randn(1, 2, 64, 16, generator=g)
    wanted = [5, 17, 40, 41]
    k[..., wanted, 3], k[..., wanted, 11] = 1.5, -1.5
    ctx = context(q, k, 0.9375)  # the last row keeps 4 of 64
    sparq = policies.make("sparq", channels=0.125)
    assert sparq.rank(16) == 2 and sparq.read_cost(16, 0.99) == 0.125
    keep = keep_mask(sparq, ctx)[0, :, 0]
    oracle = keep_mask(policies.make("topk"), ctx)[0, :, 0]
    assert keep.nonzero()[:, 1].view(2, 4).tolist() == [wanted, wanted]
    assert torch.equal(keep, oracle)
    every = policies.make("sparq", channels=1.0)
    noise = context(
        torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g), 0.8
    )
    assert torch.equal(keep_mask(every, noise), keep_mask(policies.make("topk"), noise))


def test_loki_finds_the_oracles_keys_in_the_keys_principal_axes():
    """Keys in a 4-dimensional subspace of 16 channels (rotated, so no channel holds it):
    Loki's axes, fitted on the cached keys, put the subspace first, and reading 4 of 16
    (1/4) it scores every key exactly, so it keeps the oracle's keys; the first 4 channels
    as they are (no axes yet) do not."""
    g = torch.Generator().manual_seed(4)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    k = (torch.randn(1, 2, 96, 4, generator=g) @ rot[:4]).contiguous()  # (1, 2, 96, 16)
    q = torch.randn(1, 2, 1, 16, generator=g)
    loki = policies.make("loki", channels=0.25)
    assert loki.rank(16) == 4 and loki.read_cost(16, 0.9) == 0.25
    oracle = keep_mask(policies.make("topk"), context(q, k, 0.9))
    cold = keep_mask(loki, context(q, k, 0.9))  # no axes yet: the first 4 channels
    assert not torch.equal(cold, oracle)
    history = LayerHistory()
    loki.remember(context(q, k, 0.9, history))  # axes fitted on the cached keys
    assert torch.equal(keep_mask(loki, context(q, k, 0.9, history)), oracle)


def test_two_stage_reads_quests_candidates_then_exact_scores():
    """Two-stage selection keeps the oracle's keys when the oracle's pages are among
    Quest's candidates: here, with every page a candidate, exactly the oracle; with a few
    candidate pages, the best keys inside the pages Quest ranks first (a page holding a
    key aligned with the query). Twilight's top-p keeps fewer keys where the attention is
    concentrated."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 4, 16, generator=g)
    k = torch.randn(1, 2, 128, 16, generator=g)
    ctx = context(q, k, 0.9)
    every = policies.make("two_stage", page=16, expand=10.0)
    assert torch.equal(keep_mask(every, ctx), keep_mask(policies.make("topk"), ctx))
    k[..., 40, :] = 4.0 * q[..., -1, :]  # one key of page 2 that the last row attends to
    ctx = context(q, k, 0.9)
    two = policies.make("two_stage", page=16, expand=2.0)  # the last row: 2 pages of 16
    assert two.read_cost(16, 0.9) == pytest.approx(2 / 16 + 0.2)
    cand = two.candidates(ctx)[0, :, -1]  # (H, T): the last row's candidates
    assert cand[:, 32:48].all() and cand[:, 112:].all()  # the aligned page, its own page
    assert cand.sum(-1).tolist() == [32, 32]
    keep = keep_mask(two, ctx)[0, :, -1]
    assert keep[:, 40].all() and (keep & ~cand).sum() == 0
    twilight = policies.make("two_stage", page=16, expand=4.0, top_p=0.5)
    kept = keep_mask(twilight, ctx)[0, :, -1].sum(-1)
    assert (kept >= 1).all() and (kept < keep.sum(-1)).all()  # concentrated: fewer keys


def test_xattention_takes_a_calibrated_threshold_per_head():
    """Per-head thresholds (the released RULER runs'): with every share equal, a head at
    threshold 1.0 keeps every block, a head at 0.3 fewer, under a budget that allows all."""
    q = torch.zeros(1, 2, 64, 4)
    k = torch.zeros(1, 2, 64, 4)  # uniform estimated attention
    per_head = policies.make(
        "xattention",
        block_size=8,
        stride=4,
        threshold_only=True,
        head_thresholds={"0": [1.0, 0.3]},
    )
    row = keep_mask(per_head, context(q, k, 0.0))[0, :, -1]  # (H, T): the last row
    assert row[0].all() and 0 < int(row[1].sum()) < 64
    with pytest.raises(UserError, match="needs 2 values"):
        keep_mask(policies.make("xattention", head_thresholds={"0": [0.5]}), context(q, k, 0.5))


def test_cab_as_a_reranker_keeps_only_quests_candidates():
    """With candidates, CAB ranks only the key blocks a Quest stage keeps for that many
    times the row's budget (its own block and block 0 always); with room for every block
    it is CAB itself."""
    from attnlab.policies.quest import page_bounds, upper_bound

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 160, 16, generator=g), torch.randn(1, 2, 160, 16, generator=g)
    ctx = context(q, k, 0.5)
    plain = keep_mask(policies.make("cab", block_size=16), ctx)
    wide = policies.make("cab", block_size=16, candidates=100.0)
    assert torch.equal(keep_mask(wide, context(q, k, 0.5)), plain)
    narrow = policies.make("cab", block_size=16, candidates=1.0)
    keep = keep_mask(narrow, context(q, k, 0.5))[0, :, -1]  # (H, T): the last row
    kmin, kmax = page_bounds(k, 16)
    bound = upper_bound(q[..., -1:, :], kmin, kmax)[0, :, 0]  # (H, M)
    best = bound.topk(5, dim=-1).indices  # ceil(1.0 x 80 / 16) = 5 candidate blocks
    for h in range(2):
        blocks = set(keep[h].view(10, 16).any(-1).nonzero().flatten().tolist())
        assert blocks - {0, 9} <= set(best[h].tolist())
    assert not torch.equal(keep, plain[0, :, -1])


def test_cab_reranker_spends_its_candidates_on_blocks_the_rows_see():
    """CAB's scores cover blocks a row cannot see (the prompt form's later blocks, and in
    both forms the keys a sliding window hides): a row's Quest candidates must be blocks
    it sees, or they are spent on keys it cannot keep and it keeps fewer than its budget
    (the achieved sparsity above the target)."""
    from attnlab import sparse
    from attnlab.blocks import visible_per_block

    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, 640, 16, generator=g), torch.randn(1, 2, 640, 16, generator=g)

    def windowed():  # every row sees its last 256 keys
        ctx = context(q, k, 0.5)
        ctx.visible = ctx.visible & torch.ones(640, 640, dtype=torch.bool).triu(-255)
        ctx.budget = row_budget(ctx.visible.sum(-1), 0.5)
        return ctx

    ends = torch.arange(15, 640, 16)
    ctx = windowed()
    count = visible_per_block(ctx.visible[..., ends, :], 16)  # (1, 1, Mq, Mk)
    for form in ("prompt", "causal"):
        for params in [{}, {"candidates": 1.0}]:
            policy = policies.make("cab", block_size=16, selection=form, **params)
            run = sparse.SparseRun(policy, 0.5, whole_prompt=True)
            blocks = run.block_selection(windowed())  # (1, H, Mq, Mk)
            kept = (blocks * count).sum(-1)  # each query block's last row's kept keys
            assert (kept >= ctx.budget[..., ends] - 32).all(), (form, params)


@pytest.mark.parametrize("magnitude", ["quest", "sparq"])
def test_cab_blends_curvature_with_another_predictor(magnitude):
    """``magnitude``: at lam 0 CAB ranks key blocks by the other predictor alone (Quest's
    page bound: Quest's own choice; SparQ's estimate: its largest key per block), at lam 1
    by curvature alone, whatever the predictor; a planted key the last query points at is
    kept by the blend at lam 0.5."""
    from attnlab.policies.sparq import SparQ

    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 2, 160, 16, generator=g), torch.randn(1, 2, 160, 16, generator=g)
    k[..., 37, :] = 4.0 * q[..., -1, :]  # block 2 holds the key of the last row's largest score
    common = dict(block_size=16, sink_block=False)

    def last_row_blocks(policy):  # (H, M) bool: the blocks the last row keeps
        return keep_mask(policy, context(q, k, 0.8))[0, :, -1].view(2, 10, 16).any(-1)

    alone = last_row_blocks(policies.make("cab", magnitude=magnitude, lam=0.0, **common))
    if magnitude == "quest":
        assert torch.equal(alone, last_row_blocks(policies.make("quest", **common)))
    else:
        est = SparQ().score(context(q, k, 0.8))[0, :, -1].view(2, 10, 16).amax(-1)
        for h in range(2):  # 32 keys: the own block and the best other one
            best = set(est[h, :9].topk(1).indices.tolist()) | {9}
            assert set(alone[h].nonzero().flatten().tolist()) == best
    curvature = last_row_blocks(policies.make("cab", magnitude=magnitude, lam=1.0, **common))
    assert torch.equal(curvature, last_row_blocks(policies.make("cab", lam=1.0, **common)))
    half = last_row_blocks(policies.make("cab", magnitude=magnitude, lam=0.5, **common))
    assert half[:, 2].all()


@pytest.mark.parametrize("name", ["sparq", "quest", "topk"])
def test_top_p_keeps_the_fewest_of_the_budgets_keys_holding_p_of_their_attention(name):
    """Twilight's budget mode on any policy that does not evict: of the keys the budget
    keeps for a row, the most attended first until their share of those keys' attention
    reaches top_p; so a subset of the plain policy's keys, and none of them left out whose
    weight exceeds a kept one's."""
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 160, 16, generator=g)
    k[..., 40, :] = 3.0 * q[..., -1, :]  # concentrate the last row's attention
    ctx = context(q, k, 0.5)
    plain = keep_mask(policies.make(name), ctx)
    pruned = keep_mask(policies.make(name, top_p=0.8), context(q, k, 0.5))
    assert (pruned & ~plain).sum() == 0 and pruned.sum() < plain.sum()
    weight = torch.softmax(ctx.scores.masked_fill(~plain, -INF), dim=-1)  # over the kept
    share = (weight * pruned).sum(-1)
    least = weight.masked_fill(~pruned, INF).amin(-1)  # the least attended key it keeps
    assert (share >= 0.8 - 1e-6).all()
    assert (share - least < 0.8).all()  # without its least key a row falls below top_p
    dropped = weight.masked_fill(~(plain & ~pruned), -INF).amax(-1)
    assert (dropped <= least).all()


def test_top_p_is_refused_where_it_cannot_prune_per_generated_token():
    """An evicting policy has no top_p (its cache, not each row, is chosen) and the
    prefill regime's rows are not Twilight's setting: one line, before anything runs."""
    from attnlab import sparse

    with pytest.raises(UserError, match="'h2o' has no parameter 'top_p'"):
        policies.make("h2o", top_p=0.9)
    with pytest.raises(UserError, match="top_p .* the cache regime only"):
        sparse.SparseRun(policies.make("sparq", top_p=0.9), 0.9, regime="prefill")
    sparse.SparseRun(policies.make("sparq", top_p=0.9), 0.9, regime="cache")
    sparse.SparseRun(policies.make("two_stage", top_p=0.9), 0.9, regime="prefill")


@pytest.mark.parametrize("magnitude", ["coarse", "quest", "sparq"])
def test_cab_blend_scores_a_row_from_keys_at_or_before_it(magnitude):
    """A key after a row (here inside the row's own block) leaves that row's block scores
    unchanged: Quest's bound of the own page, which reads the page's later keys, must not
    reach the blend's z-score."""
    g = torch.Generator().manual_seed(10)
    q, k = torch.randn(1, 2, 160, 16, generator=g), torch.randn(1, 2, 160, 16, generator=g)
    policy = policies.make("cab", magnitude=magnitude, lam=0.5, block_size=16)
    before = policy.score(context(q, k, 0.5))[..., 80, :]
    k[..., 85, :] += 3.0  # a later key of row 80's block
    after = policy.score(context(q, k, 0.5))[..., 80, :]
    # equal up to float noise (the batched products over every row change, ~1e-7); a
    # leak moves the scores by tenths
    torch.testing.assert_close(before, after, rtol=0, atol=1e-4)


def test_the_read_cost_counts_the_keys_top_p_reads():
    """With top_p a row also reads the budget's keys (1 - s of them) to prune; two-stage's
    own pruning reads candidates its cost already counts."""
    from attnlab.niah_jobs import choice_read_cost

    sparq = policies.make("sparq")
    assert choice_read_cost(sparq, 64, 0.95) == pytest.approx(0.125)
    assert choice_read_cost(policies.make("sparq", top_p=0.9), 64, 0.95) == pytest.approx(0.175)
    two = policies.make("two_stage", top_p=0.9)
    assert choice_read_cost(two, 64, 0.95) == pytest.approx(two.read_cost(64, 0.95))
