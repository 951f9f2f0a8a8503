"""XAttention's Triton estimate (``kernels.xattention.block_shares``) equals the PyTorch
shares, and the fused prefill's selection takes it. The interpreter on the CPU, compiled
with TRITON_INTERPRET=0 on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.test_cab_forms import DEVICE, _rand  # noqa: E402

from attnlab import policies, sparse  # noqa: E402
from attnlab.blocks import expand_kv  # noqa: E402
from attnlab.kernels.xattention import block_shares  # noqa: E402
from attnlab.policies.xattention import XAttention  # noqa: E402


@pytest.mark.parametrize(
    "t, block_size, stride, d",
    [(200, 32, 4, 16), (257, 16, 2, 16), (100, 16, 1, 8), (300, 64, 8, 32), (300, 128, 8, 256)],
)  # the last: Gemma-3-270M's block, stride and head dim (one stage of narrower tiles)
def test_block_shares_equal_the_pytorch_shares(t, block_size, stride, d):
    """Every block's first and last row (the causal and prompt forms' rows) and rows
    inside blocks, with GQA and a ragged last block: the kernel's shares are
    ``XAttention.shares``' up to float32 summation order."""
    q, k = _rand(1, 2, t, d, seed=1), _rand(1, 1, t, d, seed=2)
    policy = XAttention(block_size=block_size, stride=stride)
    starts = torch.arange(0, t, block_size, device=DEVICE)
    inside = torch.randint(0, t, (6,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for q_pos in (starts, (starts + block_size - 1).clamp(max=t - 1), inside):
        want = policy.shares(q, expand_kv(k, 2), q_pos, 0.3)
        got = policy.shares(q, k, q_pos, 0.3, kernel=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert bool((want.sum(-1)[..., q_pos >= block_size] > 0.99).all())  # shares, not 0


@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: tensor cores on a GPU
def test_rows_sharing_a_program_sum_as_rows_alone(g, dtype):
    """``rows_per_program``: rows in any order, repeated, of any length and a ragged last
    program give each row the sums it gets alone (up to float32 summation order)."""
    t, bs, stride = 300, 64, 4
    q, k = (_rand(1, h, t, 32, seed=15 + h).to(dtype) for h in (2, 1))
    gen = torch.Generator().manual_seed(17)
    lo = torch.randint(0, t // stride - 16, (11,), generator=gen)
    hi = lo + torch.randint(0, 17, (11,), generator=gen)
    lo, hi = torch.cat([lo, lo[:1]]).to(DEVICE), torch.cat([hi, hi[:1]]).to(DEVICE)
    alone = block_shares(q, k, lo, hi, stride, bs, 0.3, rows_per_program=1)
    shared = block_shares(q, k, lo, hi, stride, bs, 0.3, rows_per_program=g)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)
    n = (hi - lo).float().expand_as(alone[..., 0])  # each strided query's softmax sums to 1
    torch.testing.assert_close(alone.sum(-1), n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sweep_split_among_programs_sums_as_one(dtype):
    """``split_keys``: rows whose strided keys several programs sweep (splits of 16, 32 and
    48 keys, the last ragged; two rows a program, a window's first blocks), each query's
    maximum and total joined over its splits, give the sums of one sweep (up to float32
    summation order)."""
    t, bs, stride = 520, 32, 4
    q, k = (_rand(1, 1, t, 16, seed=s).to(dtype) for s in (22, 21))  # one head each: GQA above
    starts = torch.arange(0, t, bs, device=DEVICE)
    lo, hi = starts // stride, (starts + bs) // stride
    first = ((starts - 200).clamp(min=0) // bs).to(torch.int32)
    kw = dict(block_n=16, rows_per_program=2, first=first)
    one = block_shares(q, k, lo, hi, stride, bs, 0.3, split_keys=10**6, **kw)
    assert bool((one > 0).any())
    for keys in (16, 32, 48):  # 9, 5 and 3 splits of 9 key tiles
        split = block_shares(q, k, lo, hi, stride, bs, 0.3, split_keys=keys, **kw)
        torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-6)


def test_a_split_that_sees_no_causal_key_of_a_query_adds_nothing():
    """The causal form's rows straddle the splits' edges (two rows a program, the later
    row's keys past the earlier row's queries) and every estimate is far below 0: a split
    with no causal key for a query leaves its sums alone (no 0 * inf), as one sweep does;
    a fill of 0 for its maximum made NaN here."""
    t, bs, stride = 192, 16, 4
    policy = XAttention(block_size=bs, stride=stride)
    lo, hi = policy.strided_queries(torch.arange(0, t, bs, device=DEVICE))
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(1, 1, t, 16, generator=g) * 0.1 + 3.0).to(DEVICE)
    q = (torch.randn(1, 1, t, 16, generator=g) * 0.1 - 3.0).to(DEVICE)
    kw = dict(block_n=16, rows_per_program=2)
    one = block_shares(q, k, lo, hi, stride, bs, 1.0, split_keys=10**6, **kw)
    split = block_shares(q, k, lo, hi, stride, bs, 1.0, split_keys=16, **kw)
    assert bool(torch.isfinite(split).all())
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-30)


def test_block_shares_refuse_a_stride_that_does_not_split_blocks_in_powers_of_two():
    q = _rand(1, 1, 64, 16, seed=4)
    with pytest.raises(ValueError, match="power of two"):
        block_shares(q, q, torch.zeros(1), torch.ones(1), 4, 24, 0.3)


def _margins(share: torch.Tensor, threshold: float, must: torch.Tensor) -> torch.Tensor:
    """Per (head, query block), how far its blocks' cumulative shares stay from the
    threshold, and its shares from each other (``XAttention.score``'s two decisions):
    where both are wide, float rounding cannot change the blocks it keeps. (B, H, M)."""
    first = (share * must).sum(-1, keepdim=True)
    ranked = share.masked_fill(must, -1.0).sort(-1, descending=True).values.clamp(min=0)
    before = first + ranked.cumsum(-1) - ranked
    gaps = (ranked[..., :-1] - ranked[..., 1:]).masked_fill(ranked[..., 1:] == 0, torch.inf)
    return torch.minimum((before - threshold).abs().amin(-1), gaps.amin(-1))


def _decided(share: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, H, M) where rounding cannot change the blocks of one row per query block
    (block 0 and the row's own block kept first): its :func:`_margins` wide."""
    m = share.shape[-2]
    must = torch.zeros_like(share, dtype=torch.bool)
    must[..., 0] = True
    must[..., torch.arange(m), torch.arange(m)] = True
    return _margins(share, threshold, must) > 1e-4


@pytest.mark.parametrize("form", ["causal", "prompt"])
def test_the_fused_prefill_takes_the_kernel_and_selects_the_same(form, monkeypatch):
    """A fused prefill selection (the budget kernel's path) forms XAttention's shares with
    the kernel and keeps the blocks the PyTorch path keeps wherever rounding cannot decide
    (GQA, ragged last block, both forms)."""
    import attnlab.kernels.xattention as kernels

    calls = []
    real = kernels.block_shares
    monkeypatch.setattr(kernels, "block_shares", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    n, bs, scaling = 300, 32, 0.25
    q, k = _rand(1, 4, n, 16, seed=5), expand_kv(_rand(1, 2, n, 16, seed=6), 4)
    policy = policies.make("xattention", block_size=bs, stride=4, selection=form)
    keeps = {}
    for fused in (False, True):
        run = sparse.SparseRun(policy, 0.8, whole_prompt=True)
        keep = run.block_mask(0, q, k, scaling, kv_heads=2, lists=False if fused else None)
        keeps[fused] = keep[0] if fused else keep
    assert len(calls) == 1  # one call of the estimate's sums for the layer
    # the decisions' margins, from the PyTorch shares of the rows the form reads
    starts = torch.arange(0, n, bs, device=DEVICE)
    rows = starts if form == "causal" else (starts + bs - 1).clamp(max=n - 1)
    clear = _decided(policy.shares(q, k, rows, scaling), policy.threshold)
    assert clear.float().mean() > 0.8
    assert torch.equal(keeps[True][clear], keeps[False][clear])
    assert not keeps[True].all()  # the selection drops blocks


@pytest.mark.parametrize("threshold_only", [False, True])
@pytest.mark.parametrize("per_head, mk", [(False, 37), (True, 37), (False, 100)])
def test_the_fused_threshold_scores_as_the_pytorch_tail(threshold_only, per_head, mk):
    """``threshold_scores`` (one kernel a row) against ``XAttention.threshold_scores`` (a
    sort, a prefix sum and a scatter) with the must-keep blocks' +inf: rows that see a
    window of their blocks (of another width in each batch entry), must-keep blocks
    (block 0, the row's own), 37 or 100 blocks (ragged widths; 100 in two chunks),
    per-head thresholds; equal decisions wherever rounding cannot decide, equal shares to
    float32 rounding. Leaving the must-keep blocks' share out, or counting a block above
    itself, fails."""
    from attnlab.kernels.xattention import threshold_scores

    g = torch.Generator().manual_seed(31)
    rows, heads = 20, 3
    blocks = torch.rand(2, heads, rows, mk, generator=g) ** 4  # a few blocks dominate
    pos = torch.arange(rows)[:, None] + mk - rows - 2
    cols = torch.arange(mk)[None, :]
    # (2, 1, R, Mk): windows of 12 and 30 blocks
    seen = torch.stack([(cols <= pos) & (cols > pos - w) for w in (12, 30)])[:, None]
    must = (cols == 0) | (cols == pos)
    blocks, seen, must = blocks.to(DEVICE), seen.to(DEVICE), must.to(DEVICE)
    policy = XAttention(block_size=16, stride=4, threshold_only=threshold_only)
    if per_head:
        policy.head_thresholds = {"0": [0.5, 0.8, 0.95]}
    thresholds = policy.thresholds(0, blocks)
    got = threshold_scores(blocks, seen, must, thresholds, threshold_only)
    share = blocks / blocks.sum(-1, keepdim=True)
    want = policy.threshold_scores(share, seen, must, 0).masked_fill(must, torch.inf)
    seen_share = share * seen
    seen_share = seen_share / seen_share.sum(-1, keepdim=True)
    if per_head:
        margins = torch.stack(
            [_margins(seen_share[:, h], t, must) for h, t in enumerate([0.5, 0.8, 0.95])], 1
        )
    else:
        margins = _margins(seen_share, policy.threshold, must)
    clear = margins > 1e-5
    assert clear.float().mean() > 0.25  # the comparison is not empty
    kept_got, kept_want = got > -torch.inf, want > -torch.inf
    assert torch.equal(kept_got[clear], kept_want[clear])
    assert bool(kept_want.any(-1).all()) and not bool(kept_want[..., ~must[0]].all())
    both = kept_got & kept_want
    torch.testing.assert_close(got[both], want[both], rtol=1e-5, atol=1e-7)


def test_a_row_s_first_block_leaves_its_visible_blocks_sums_unchanged():
    """``first``: the probabilities are summed from the key tile of a row's first block
    on, so every block from there equals the sweep from block 0 (the same tiles, the
    same sums) and the blocks of earlier tiles stay 0."""
    t, bs, stride = 520, 32, 4
    q, k = _rand(1, 1, t, 16, seed=7), _rand(1, 1, t, 16, seed=8)
    starts = torch.arange(0, t, bs, device=DEVICE)
    lo, hi = starts // stride, (starts + bs) // stride
    first = ((starts - 200).clamp(min=0) // bs).to(torch.int32)  # a 200-key window's edge
    kw = dict(block_n=16, rows_per_program=1)
    whole = block_shares(q, k, lo, hi, stride, bs, 0.3, **kw)
    part = block_shares(q, k, lo, hi, stride, bs, 0.3, first=first, **kw)
    kb = torch.arange(whole.shape[-1], device=DEVICE)
    tile_first = first[:, None] * (bs // stride) // 16 * 16 // (bs // stride)  # (R, 1)
    assert bool((first > 2).any())
    used = kb >= tile_first
    assert torch.equal(part[..., used], whole[..., used])
    assert bool((part[..., ~used] == 0).all()) and bool((whole[..., ~used] > 0).any())
    kw["rows_per_program"] = 2  # two rows a program: from the earlier row's first block
    whole = block_shares(q, k, lo, hi, stride, bs, 0.3, **kw)
    part = block_shares(q, k, lo, hi, stride, bs, 0.3, first=first, **kw)
    assert torch.equal(part[..., used], whole[..., used])
    assert bool((part[..., ~used] == 0).any()) and bool((whole[..., ~used] > 0).any())


@pytest.mark.parametrize("form", ["causal", "prompt"])
def test_the_fused_prefill_under_a_window_sums_from_each_row_s_first_block(form, monkeypatch):
    """Under a sliding window the fused selection hands the kernel each row's first
    visible block and keeps the blocks the PyTorch path keeps wherever rounding cannot
    decide."""
    from tests.test_windows import _recipe

    import attnlab.kernels.xattention as kernels
    from attnlab.masks import ModelMask

    firsts = []
    real = kernels.block_shares

    def spy(*a, **kw):
        firsts.append(kw["first"])
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "block_shares", spy)
    n, bs, w, scaling = 300, 32, 90, 0.25
    q, k = _rand(1, 4, n, 16, seed=9), expand_kv(_rand(1, 2, n, 16, seed=10), 4)
    policy = policies.make("xattention", block_size=bs, stride=4, selection=form)
    keeps = {}
    for fused in (False, True):
        mask = ModelMask(_recipe(n, w, device=torch.device(DEVICE)))
        run = sparse.SparseRun(policy, 0.5, whole_prompt=True)
        keep = run.block_mask(0, q, k, scaling, 2, mask, lists=True if fused else None)
        keeps[fused] = keep[0] if fused else keep
    (first,) = firsts
    starts = torch.arange(0, n, bs, device=DEVICE)
    rows = starts if form == "causal" else (starts + bs - 1).clamp(max=n - 1)
    assert torch.equal(first.cpu(), ((rows.cpu() - w + 1).clamp(min=0) // bs).int())
    share = policy.shares(q, k, rows, scaling)
    share = share * (mask.block_counts(rows, rows, bs) > 0)
    clear = _decided(share / share.sum(-1, keepdim=True), policy.threshold)
    assert clear.float().mean() > 0.5
    assert torch.equal(keeps[True][clear], keeps[False][clear])
