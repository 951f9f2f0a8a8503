"""The fused budget kernel (Triton: the interpreter on the CPU, compiled on a GPU) selects
exactly what the PyTorch selection does and lists the blocks exactly as the BlockMask path
does."""

import os

import pytest
import torch

from attnlab.flex import ordered_blocks
from attnlab.kernels.budget import budget_select, causal_bands, row_bands
from attnlab.policies.selection import INF, keep_blocks_by_budget

# the compiled kernel where there is a GPU and the interpreter is off, else the interpreter
DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"


def _case(m: int, seed: int, heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    # few distinct values, so that ties are common; must-keep and excluded blocks
    score = torch.randint(0, 5, (1, heads, m, m), generator=g).float() - 2.0
    score[torch.rand(score.shape, generator=g) < 0.05] = INF
    score[torch.rand(score.shape, generator=g) < 0.05] = -INF
    score[..., 0, 1] = -0.0  # -0.0 ties with +0.0, as in a sort
    count = torch.randint(0, 17, (1, 1, m, m), generator=g)
    count = count * torch.ones(m, m).tril().long()  # a causal grid: nothing above the diagonal
    count[..., 3, :] = 0  # a row that sees nothing
    budget = torch.randint(1, 16 * m, (1, heads, m), generator=g)
    return score.to(DEVICE), count.to(DEVICE), budget.to(DEVICE)


@pytest.mark.parametrize("m, seed", [(5, 0), (23, 1), (100, 2)])
@pytest.mark.parametrize("all_partial", [False, True])
def test_fused_budget_selection_equals_the_pytorch_selection(m, seed, all_partial):
    """Grids of 5, 23 and 100 blocks: launches of rows 8 to 128 blocks wide, a window's
    band's width and wider."""
    score, count, budget = _case(m, seed)
    want = keep_blocks_by_budget(score, count, budget)
    keep, (full_num, full_idx, part_num, part_idx) = budget_select(
        score, count, budget, all_partial
    )
    assert torch.equal(keep, want)
    assert want.any() and not want.all()
    below = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril(-1)
    diag = torch.eye(m, dtype=torch.bool, device=DEVICE)
    if all_partial:
        assert full_num is None
        _same_kept_lists((part_num, part_idx), ordered_blocks(want & (below | diag)))
    else:
        for got, sel in (((full_num, full_idx), below), ((part_num, part_idx), diag)):
            _same_kept_lists(got, ordered_blocks(want & sel))


@pytest.mark.parametrize("m, seed, width", [(23, 1, None), (40, 2, 5)])
def test_the_kernel_sums_the_kept_pairs_as_the_keep_mask_counts_them(m, seed, width):
    """With the visible pairs of each block pair the kernel also returns the pairs its
    selection keeps, every head and row summed: what the prefill's accounting counts from
    the keep-mask, and the same selection and lists as without them."""
    score, count, budget = _case(m, seed)
    if width is not None:  # a window's band, as in the test below
        rows = torch.arange(m, device=DEVICE)
        band = (rows[None, :] <= rows[:, None]) & (rows[None, :] > rows[:, None] - width)
        count = count.clamp(min=1) * band
    g = torch.Generator().manual_seed(seed)
    pairs = (torch.randint(1, 257, (m, m), generator=g) * (count[0, 0].cpu() > 0)).to(DEVICE)
    keep, lists = budget_select(score, count, budget, width is not None)
    again, same_lists, kept = budget_select(score, count, budget, width is not None, pairs=pairs)
    assert torch.equal(again, keep)
    for got, want in zip(same_lists[::2], lists[::2], strict=True):  # (num, idx) each
        assert (got is None and want is None) or torch.equal(got, want)
    _same_kept_lists(same_lists[2:], lists[2:])
    if width is None:
        _same_kept_lists(same_lists[:2], lists[:2])
    assert kept.dtype == torch.int64 and kept.dim() == 0
    assert kept.item() == (keep.long() * pairs).sum().item() > 0


@pytest.mark.parametrize("all_partial", [False, True])
def test_rows_selects_the_first_query_blocks_alone(all_partial):
    """``rows``: the first query blocks choose as they do among every row (the same
    keep-mask rows, the same lists), the later rows of the keep-mask stay False and their
    pairs are not counted; rows 0: nothing chosen, nothing counted."""
    m, cut = 23, 9
    score, count, budget = _case(m, 1)
    pairs = (torch.arange(1, m * m + 1).view(m, m) * (count[0, 0].cpu() > 0)).to(DEVICE)
    keep, lists, kept = budget_select(score, count, budget, all_partial, pairs=pairs)
    part, part_lists, part_kept = budget_select(
        score, count, budget, all_partial, pairs=pairs, rows=cut
    )
    assert torch.equal(part[..., :cut, :], keep[..., :cut, :])
    assert keep[..., cut:, :].any() and not part[..., cut:, :].any()

    def first_rows(x):  # a list's first query blocks, (num, idx)
        return x if x is None else x[..., :cut, :] if x.dim() == 4 else x[..., :cut]

    head, got = [first_rows(x) for x in lists], [first_rows(x) for x in part_lists]
    for i in range(0, len(head), 2):
        if head[i] is not None:
            _same_kept_lists(got[i : i + 2], head[i : i + 2])
    assert part_kept.item() == (keep[..., :cut, :].long() * pairs[:cut]).sum().item()
    assert part_kept.item() < kept.item()
    none = budget_select(score, count, budget, all_partial, pairs=pairs, rows=0)
    assert not none[0].any() and none[2].item() == 0


def _same_kept_lists(got, want):
    """The same number of kept blocks in each list and the same blocks at its head (what
    FlexAttention reads of it)."""
    assert torch.equal(got[0], want[0])
    listed = torch.arange(got[1].shape[-1], device=DEVICE) < want[0][..., None]
    assert torch.equal(torch.where(listed, got[1], 0), torch.where(listed, want[1], 0))


@pytest.mark.parametrize("m, width, seed", [(40, 5, 2), (67, 9, 3)])
def test_a_window_band_selects_as_the_whole_row_and_lists_its_kept_blocks_alike(m, width, seed):
    """Under a window (each query block sees ``width`` key blocks up to its own) the kernel
    sorts each row's band alone: the same keep-mask as the PyTorch selection over whole
    rows, the same kept blocks at the head of the lists."""
    score, count, budget = _case(m, seed)
    rows = torch.arange(m, device=DEVICE)
    band = (rows[None, :] <= rows[:, None]) & (rows[None, :] > rows[:, None] - width)
    count = count.clamp(min=1) * band
    count[..., 3, :] = 0  # a row that sees nothing
    first, launches = row_bands(count)
    assert torch.equal(first[0].long()[rows != 3], (rows - width + 1).clamp(min=0)[rows != 3])
    assert launches == [(0, m, width)]  # every band within one power of two
    want = keep_blocks_by_budget(score, count, budget)
    keep, (_, _, part_num, part_idx) = budget_select(score, count, budget, True)
    assert torch.equal(keep, want)
    assert want.any() and not (want | ~band).all()
    _same_kept_lists((part_num, part_idx), ordered_blocks(want & band))


def test_causal_rows_launch_by_their_width():
    """A causal row's band ends at its own block: the rows launch in runs of one power of
    two, the shortest together; past ``max_launches`` runs, one launch of the widest."""
    m = 70
    count = torch.ones(m, m, dtype=torch.long, device=DEVICE).tril()[None, None]
    first, launches = row_bands(count)
    assert torch.equal(first, torch.zeros(1, m, dtype=torch.int32, device=DEVICE))
    assert launches == [(0, 16, 16), (16, 32, 32), (32, 64, 64), (64, 70, 70)]
    assert row_bands(count, max_launches=3)[1] == [(0, 70, 70)]


@pytest.mark.parametrize("m", [1, 5, 16, 17, 70, 300])
def test_a_causal_grid_s_bands_are_made_on_the_host_as_read_from_the_device(m):
    count = torch.ones(m, m, dtype=torch.long, device=DEVICE).tril()[None, None] * 16
    count[..., -1, :] = count[..., -1, :].clamp(max=5)  # a ragged last block
    for most in (12, 3):
        got, want = causal_bands(m, DEVICE, most), row_bands(count, most)
        assert torch.equal(got[0], want[0]) and got[1] == want[1]


@pytest.mark.parametrize("window", [None, 40])
def test_flex_attention_from_the_fused_lists_equals_the_keep_mask_path(window):
    """FlexAttention over the kernel's lists attends exactly as over the BlockMask built
    from its keep-mask (the path without the kernel), causal or under a window applied
    pair by pair; 90 tokens in blocks of 16, so the last block is ragged."""
    from attnlab.flex import (
        block_mask_from_keep,
        block_mask_from_lists,
        flex_block_sparse_attention,
    )

    n, bs, m = 90, 16, 6
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).to(DEVICE) for _ in range(3))
    score, count, budget = _case(m, 4)
    keep, lists = budget_select(score, count, budget, all_partial=window is not None)

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    mask_mod = None if window is None else in_window
    want = flex_block_sparse_attention(q, k, v, keep, bs, 0.25, mask_mod)
    got = flex_block_sparse_attention(q, k, v, keep, bs, 0.25, mask_mod, lists)
    assert torch.equal(got, want)
    # the same BlockMask, list for list (the CPU's eager kernel applies the mask to
    # every pair, so only the lists tell whole blocks from partial ones)
    a = block_mask_from_keep(keep, bs, m * bs, mask_mod)
    b = block_mask_from_lists(lists, bs, m * bs, mask_mod)
    for name in ("kv", "full_kv"):
        x, y = (getattr(bm, f"{name}_num_blocks") for bm in (a, b))
        assert (x is None) == (y is None) == (name == "full_kv" and window is not None)
        if x is not None:
            _same_kept_lists((y, getattr(b, f"{name}_indices")), (x, getattr(a, f"{name}_indices")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernel)")
@pytest.mark.parametrize("name", ["quest", "cab", "coarse_magnitude", "xattention"])
def test_a_gpu_prefill_with_the_fused_selection_equals_the_pytorch_one(name):
    """On CUDA, a block policy's prefill with the fused selection keeps exactly the pairs
    the PyTorch selection keeps, with the same logits (Gemma's window layers and its
    global one), and names the path it took."""
    from tests.tiny_models import tiny_gemma3

    from attnlab import policies, sparse

    model = tiny_gemma3().cuda()
    ids = torch.randint(300, 5000, (1, 200), generator=torch.Generator().manual_seed(2)).cuda()
    runs, out = {}, {}
    for fused in (False, True):
        policy = policies.make(name, block_size=16)
        runs[fused] = sparse.SparseRun(policy, 0.8, fused=fused, whole_prompt=True)
        with torch.inference_mode(), runs[fused]:
            out[fused] = model(ids, use_cache=False).logits[0]
    assert int(runs[True].recorder.kept) == int(runs[False].recorder.kept)
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-5)
    assert runs[True].kernels == {
        "flex block-sparse, model mask, fused selection": 2,
        "flex block-sparse, fused selection": 1,
    }
