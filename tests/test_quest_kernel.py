"""Quest's page bound from the Triton kernel (``kernels.quest.page_bound``) equals the
PyTorch bound, and the fused prefill's selection takes it. The interpreter on the CPU,
compiled with TRITON_INTERPRET=0 on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.test_cab_forms import DEVICE, _clear_edges, _gemma_qk, _rand, run_rows  # noqa: E402

from attnlab import policies, sparse  # noqa: E402
from attnlab.blocks import expand_kv  # noqa: E402
from attnlab.kernels.quest import page_bound  # noqa: E402
from attnlab.policies.quest import page_bounds, upper_bound  # noqa: E402


@pytest.mark.parametrize("tq, t, d, page", [(13, 200, 24, 16), (70, 300, 16, 8), (1, 40, 96, 16)])
def test_page_bound_equals_the_pytorch_bound(tq, t, d, page):
    """GQA (4 query heads over 2), a ragged last page, a head dim not a power of two."""
    q, k = _rand(1, 4, tq, d, seed=1), _rand(1, 2, t, d, seed=2)
    kmin, kmax = page_bounds(k, page)
    want = upper_bound(q, *(b.repeat_interleave(2, 1) for b in (kmin, kmax)))
    torch.testing.assert_close(page_bound(q, kmin, kmax), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inputs", ["random", "qk_norm"])
def test_the_fused_prefill_bounds_quest_with_the_kernel_and_selects_the_same(inputs, monkeypatch):
    """A fused prefill selection (the budget kernel's path) bounds Quest's pages with the
    kernel and keeps the blocks the PyTorch path keeps wherever rounding cannot decide."""
    import attnlab.kernels.quest as kernels

    calls = []
    real = kernels.page_bound
    monkeypatch.setattr(kernels, "page_bound", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    if inputs == "random":
        q, k = _rand(1, 4, 200, 16, seed=5), _rand(1, 2, 200, 16, seed=6)
    else:
        q, k = _gemma_qk()
    n, kv, bs = q.shape[-2], k.shape[1], 16
    k = expand_kv(k, 4)
    policy = policies.make("quest", block_size=bs)
    keeps, scores = {}, {}
    for fused in (False, True):
        run = sparse.SparseRun(policy, 0.8, whole_prompt=True)
        keep = run.block_mask(0, q, k, 0.25, kv_heads=kv, lists=False if fused else None)
        keeps[fused] = keep[0] if fused else keep
        ctx = run._context(0, q, k, None, 0.25, kv, rows=run_rows(n), cache={})
        ctx.triton = fused
        scores[fused] = policy.block_scores(ctx, torch.arange(0, n, bs, device=DEVICE), "causal")
    assert len(calls) == 2
    finite = scores[False] < torch.inf  # the own page is kept whatever its bound
    torch.testing.assert_close(scores[True][finite], scores[False][finite], rtol=1e-5, atol=1e-5)
    m = scores[False].shape[-1]
    later = torch.ones(m, m, dtype=torch.bool, device=DEVICE).triu(1)  # pages never seen
    clear = _clear_edges(scores[False].masked_fill(later, -torch.inf), keeps[False]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(keeps[True][clear], keeps[False][clear])


def test_bands_skip_only_tiles_outside_every_row_s_band():
    """With each row's first and last page, a tile of pages wholly outside every band of
    its rows is not multiplied (its bounds -inf); every bound inside a band is the whole
    computation's, bit for bit (129 rows over 150 pages in tiles of 64, a 66-page window:
    the last row's band starts at a tile's last page and ends at a tile's first)."""
    q, k = _rand(1, 4, 129, 16, seed=3), _rand(1, 2, 150 * 8, 16, seed=4)
    kmin, kmax = page_bounds(k, 8)
    rows = torch.arange(129, device=DEVICE)
    first, last = (rows - 65).clamp(min=0), rows
    whole = page_bound(q, kmin, kmax)
    part = page_bound(q, kmin, kmax, bands=(first, last))
    pages = torch.arange(150, device=DEVICE)
    band = (pages >= first[:, None]) & (pages <= last[:, None])
    assert torch.equal(part[..., band], whole[..., band])
    skipped = part == -torch.inf
    assert bool(skipped[..., ~band].any()) and not bool(skipped[..., band].any())
    assert torch.equal(part[~skipped], whole[~skipped])


def test_the_fused_prefill_under_a_window_bounds_each_row_s_band(monkeypatch):
    """Under a sliding window the fused selection hands the kernel each query block's
    band (its window's first page, its own) and keeps the blocks the PyTorch path keeps
    wherever rounding cannot decide."""
    from tests.test_windows import _recipe

    import attnlab.kernels.quest as kernels
    from attnlab.masks import ModelMask

    bands = []
    real = kernels.page_bound
    monkeypatch.setattr(
        kernels, "page_bound", lambda *a, **kw: bands.append(kw["bands"]) or real(*a, **kw)
    )
    n, bs, w = 2400, 8, 100  # 300 blocks: tiles of 64 left of every band
    q, k = _rand(1, 2, n, 16, seed=15), expand_kv(_rand(1, 1, n, 16, seed=16), 2)
    policy = policies.make("quest", block_size=bs)
    keeps = {}
    for fused in (False, True):
        mask = ModelMask(_recipe(n, w, device=torch.device(DEVICE)))
        run = sparse.SparseRun(policy, 0.97, whole_prompt=True)  # a few of a band's blocks
        keep = run.block_mask(0, q, k, 0.25, 1, mask, lists=True if fused else None)
        keeps[fused] = keep[0] if fused else keep
    ((first, last),) = bands
    starts = torch.arange(0, n, bs, device=DEVICE)
    assert torch.equal(first.cpu(), ((starts.cpu() - w + 1).clamp(min=0) // bs).int())
    assert torch.equal(last.cpu(), starts.cpu() // bs)
    ctx = sparse.SparseRun(policy, 0.97, whole_prompt=True)._context(
        0, q, k, None, 0.25, 1, rows=run_rows(n), cache={}
    )
    score = policy.block_scores(ctx, starts, "causal")
    seen = mask.block_counts(starts, (starts + bs - 1).clamp(max=n - 1), bs) > 0
    clear = _clear_edges(score.masked_fill(~seen, -torch.inf), keeps[False]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(keeps[True][clear], keeps[False][clear])


def test_rows_too_long_for_the_budget_kernel_choose_every_block(monkeypatch):
    """Where a row has more key blocks than one program holds the selection falls back to
    PyTorch, which chooses for every query block: coarse magnitude then scores them all,
    whatever ``chosen`` the fused path would have cut at."""
    from tests.test_windows import _recipe

    import attnlab.kernels.budget as budget
    from attnlab.masks import ModelMask

    monkeypatch.setattr(budget, "MAX_BLOCKS", 64)  # 150 blocks: too long for one program
    n, bs, w, cut = 1200, 8, 100, 60
    q, k = _rand(1, 4, n, 16, seed=17), expand_kv(_rand(1, 2, n, 16, seed=18), 4)
    policy = policies.make("coarse_magnitude", block_size=bs)
    out = {}
    for chosen in (None, cut):
        mask = ModelMask(_recipe(n, w, device=torch.device(DEVICE), batch_size=1))
        run = sparse.SparseRun(policy, 0.9, whole_prompt=True)
        pairs = mask.block_pairs(bs, torch.device(DEVICE))
        out[chosen] = run.block_mask(0, q, k, 0.25, 2, mask, True, pairs, chosen)[0]
    assert torch.equal(out[cut], out[None]) and out[None][..., cut:, :].any()


@pytest.mark.parametrize("name", ["quest", "cab", "coarse_magnitude"])
def test_the_fused_prefill_chooses_for_the_rows_before_the_whole_rows_alone(name, monkeypatch):
    """With ``chosen`` (the query blocks before a window's whole rows) the fused selection
    keeps, for those blocks, what it keeps choosing for every block; the later blocks'
    scores are skipped (their band past the last block; coarse magnitude's rows of A not
    formed) and their rows not chosen, and the kept pairs count every pair those whole
    rows see."""
    from tests.test_windows import _recipe

    import attnlab.kernels.cab as cab_kernels
    import attnlab.kernels.quest as kernels
    from attnlab.masks import ModelMask

    firsts = []
    spy = (kernels, "page_bound") if name == "quest" else (cab_kernels, "cab_scores")
    real = getattr(*spy)
    at = {
        "quest": lambda kw: kw["bands"][0],
        "cab": lambda kw: kw["first"],
        "coarse_magnitude": lambda kw: kw["rows"],
    }[name]
    monkeypatch.setattr(*spy, lambda *a, **kw: firsts.append(at(kw)) or real(*a, **kw))
    n, bs, w, cut = 1200, 8, 100, 60  # 150 query blocks, the last 90 whole
    q, k = _rand(1, 2, n, 16, seed=17), expand_kv(_rand(1, 1, n, 16, seed=18), 2)
    policy = policies.make(name, block_size=bs)
    out = {}
    for chosen in (None, cut):
        mask = ModelMask(_recipe(n, w, device=torch.device(DEVICE), batch_size=1))
        run = sparse.SparseRun(policy, 0.9, whole_prompt=True)
        pairs = mask.block_pairs(bs, torch.device(DEVICE))
        out[chosen] = run.block_mask(0, q, k, 0.25, 1, mask, True, pairs, chosen)
    every, part = out[None], out[cut]
    assert torch.equal(part[0][..., :cut, :], every[0][..., :cut, :])
    assert not part[0][..., cut:, :].any() and every[0][..., cut:, :].any()
    num, idx = part[1][2][..., :cut], part[1][3][..., :cut, :]
    assert torch.equal(num, every[1][2][..., :cut])
    listed = torch.arange(idx.shape[-1], device=DEVICE) < num[..., None]
    assert torch.equal(idx[listed], every[1][3][..., :cut, :][listed])
    # the chosen rows' kept pairs, then every pair the whole rows see, in each of 2 heads
    want = (part[0][0, :, :cut].long().sum(0) * pairs[:cut]).sum() + 2 * pairs[cut:].sum()
    assert part[2].item() == want.item()
    if name == "coarse_magnitude":  # the first cut query blocks' rows of A alone
        assert firsts == [None, cut]
        return
    m = n // bs
    assert torch.equal(firsts[1][cut:].cpu(), torch.full((m - cut,), m, dtype=firsts[1].dtype))
    assert torch.equal(firsts[1][:cut].cpu(), firsts[0][:cut].cpu())
