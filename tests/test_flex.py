"""FlexAttention over a block selection equals masked softmax attention with the same mask."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnlab import flex
from attnlab.flex import (
    block_mask_from_keep,
    flex_attention_from_selection,
    flex_block_sparse_attention,
    listed,
    ordered_blocks,
    tiled_block_mask,
)
from attnlab.kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-3, atol=2e-3) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-5)


def _qkv(n, heads=4, kv_heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g).to(DEVICE) for h in (heads, kv_heads, kv_heads)]


def _masked_attention(q, k, v, token_keep, scaling):
    """Eager masked softmax in float64; token_keep: (B, H, N, N) bool, causal already applied."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(~token_keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)


def _token_mask(block_keep, q_block, kv_block, n):
    t = torch.arange(n, device=block_keep.device)
    kept = block_keep[:, :, (t // q_block)[:, None], (t // kv_block)[None, :]]
    return kept & (t[:, None] >= t[None, :])


def _random_keep(b, h, mq, mk, seed, q_group=1):
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(b, h, mq, mk, generator=g) < 0.4).to(DEVICE)
    rows = torch.arange(mq, device=DEVICE)
    keep[:, :, rows, (rows * q_group).clamp(max=mk - 1)] = True  # every query sees a block
    return keep


@pytest.mark.parametrize("n", [96, 100])  # 100: a ragged last block
def test_block_sparse_flex_matches_masked_softmax(n):
    q, k, v = _qkv(n)
    block_size = 16
    m = -(-n // block_size)
    keep = _random_keep(1, 4, m, m, seed=n)
    out = flex_block_sparse_attention(q, k, v, keep, block_size, 0.3)
    expected = _masked_attention(q, k, v, _token_mask(keep, block_size, block_size, n), 0.3)
    torch.testing.assert_close(out, expected, **TOL)


def test_a_query_block_with_nothing_kept_gets_zeros():
    q, k, v = _qkv(64)
    keep = _random_keep(1, 4, 4, 4, seed=1)
    keep[:, :, 2] = False
    out = flex_block_sparse_attention(q, k, v, keep, 16, 0.3)
    assert torch.all(out[:, :, 32:48] == 0)


def test_block_mask_puts_only_the_diagonal_under_the_causal_mask():
    m = 6
    keep = _random_keep(1, 2, m, m, seed=2)
    block_mask = block_mask_from_keep(keep, 16, 96)
    causal_blocks = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril()
    assert torch.equal(block_mask.to_dense().bool(), keep & causal_blocks)
    for h in range(2):
        for g in range(m):
            full = block_mask.full_kv_indices[0, h, g, : block_mask.full_kv_num_blocks[0, h, g]]
            part = block_mask.kv_indices[0, h, g, : block_mask.kv_num_blocks[0, h, g]]
            assert bool((full < g).all()) and bool((part == g).all())


def _selection_from_mask(mask, q_group):
    """BlockSelection-like lists from a grouped (B, H, Mg, M) mask, as the select kernel makes."""
    mg, m = mask.shape[-2:]
    first = (torch.arange(mg, device=mask.device) * q_group)[:, None]
    cols = torch.arange(m, device=mask.device)[None, :]
    lists = {}
    for name, part in (("full", mask & (cols < first)), ("partial", mask & (cols >= first))):
        lists[f"{name}_num"] = part.sum(-1, dtype=torch.int32)
        order = part.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        lists[f"{name}_idx"] = order.int()
    return SimpleNamespace(q_group=q_group, mask=mask, **lists)


def test_selection_path_attends_whole_query_groups():
    n, kv_block, q_group = 128, 16, 2
    q, k, v = _qkv(n, seed=3)
    m = n // kv_block
    g = torch.Generator().manual_seed(4)
    score = torch.randn(1, 4, m, m, generator=g).to(DEVICE)
    causal = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril()
    score = score.masked_fill(~causal, float("-inf"))
    mg = m // q_group
    must = torch.zeros(mg, m, dtype=torch.bool, device=DEVICE)
    must[torch.arange(mg), torch.arange(mg) * q_group] = True  # the diagonal block
    mask = ref.top_blocks_grouped(score, torch.full((mg,), 2, device=DEVICE), q_group, must)
    out = flex_attention_from_selection(q, k, v, _selection_from_mask(mask, q_group), kv_block, 0.3)
    expected = _masked_attention(q, k, v, _token_mask(mask, q_group * kv_block, kv_block, n), 0.3)
    torch.testing.assert_close(out, expected, **TOL)


def _window(size):
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < size)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("tile", [(64, 16), (128, 64), (32, 32), (16, 64)])
@pytest.mark.parametrize("n", [128, 150])  # 150: neither the blocks nor the tiles whole
def test_a_selection_run_in_coarser_tiles_attends_exactly_its_pairs(n, tile, window):
    """Tiles of several blocks, each pair looked up in the selection, attend the same
    pairs as tiles of the block: masked softmax over the kept blocks (under the window)."""
    q, k, v = _qkv(n, seed=5)
    m = -(-n // 16)
    keep = _random_keep(1, 4, m, m, seed=6)
    keep[:, 1, :, : m // 2] = True  # whole tiles below the diagonal: listed as full
    token_keep = _token_mask(keep, 16, 16, n)
    mask_mod = None if window is None else _window(window)
    if window is not None:
        t = torch.arange(n, device=DEVICE)
        token_keep &= (t[:, None] - t[None, :]) < window
    out = flex_block_sparse_attention(q, k, v, keep, 16, 0.3, mask_mod, tile=tile)
    torch.testing.assert_close(out, _masked_attention(q, k, v, token_keep, 0.3), **TOL)
    block_mask, padded = tiled_block_mask(keep, 16, tile, mask_mod)
    assert padded % max(tile) == 0 and padded >= n
    if window is None and tile[0] < 128:  # head 1's whole tiles below a query tile are
        # full (the mask_mod skipped); no 128-row tile has one here
        assert int(block_mask.full_kv_num_blocks[0, 1].sum()) > 0
    if window is None:  # the CPU's flex applies the mask_mod to every tile: check the
        # full lists themselves, no key of a full tile after its query tile's first row
        for (h, i), num in np.ndenumerate(block_mask.full_kv_num_blocks[0].cpu().numpy()):
            kv = block_mask.full_kv_indices[0, h, i, :num].cpu()
            assert bool(((kv + 1) * tile[1] <= i * tile[0]).all())


def test_listed_gives_the_sorted_lists_first_entries():
    keep = _random_keep(2, 3, 9, 33, seed=7)
    keep[0, 0, 0] = True
    keep[0, 0, 1] = False
    num, idx = listed(keep)
    want_num, want_idx = ordered_blocks(keep)
    assert torch.equal(num, want_num)
    first = torch.arange(33, device=DEVICE) < num[..., None]
    assert torch.equal(torch.where(first, idx, -1), torch.where(first, want_idx, -1))


def test_a_window_layer_s_selection_runs_in_the_window_tile(tiny_gemma3, monkeypatch):
    """A block policy's prefill of Gemma 3 with ``tiles="window"`` runs its window layers'
    selection in flex.WINDOW_TILE (its causal layers in tiles of the block), with the
    logits it has in tiles of the block."""
    from attnlab import policies, sparse

    ids = torch.randint(0, 100, (1, 150), generator=torch.Generator().manual_seed(8))
    tiles = []
    real = flex.tiled_block_mask

    def spy(keep, block_size, tile, mask_mod):
        tiles.append(tile)
        return real(keep, block_size, tile, mask_mod)

    monkeypatch.setattr(flex, "tiled_block_mask", spy)
    quest = policies.make("quest", block_size=16)

    def logits(tiled):
        run = sparse.SparseRun(quest, 0.8, backend="flex", tiles="window" if tiled else "block")
        with run, torch.no_grad():
            return tiny_gemma3(input_ids=ids.to(tiny_gemma3.device)).logits

    in_tiles = logits(True)
    assert tiles == [flex.WINDOW_TILE] * 2  # both window layers, no causal one
    torch.testing.assert_close(in_tiles, logits(False), rtol=1e-5, atol=1e-5)
    assert len(tiles) == 2  # tiles of the block: none made


def test_whole_rows_run_as_the_model_mask_and_the_rows_before_them_in_blocks():
    """Under a window, ``whole`` (r, k0, the model's BlockMask from row r over the keys
    from k0): the rows from r run as that mask, the rows before r in tiles of the block;
    together masked softmax over the kept pairs, the rows from r keeping all they see,
    whatever ``block_keep`` says of them (the caller's promise, not read)."""
    from tests.test_windows import _recipe

    from attnlab.masks import ModelMask
    from attnlab.windows import rows_of, window_mask_mod

    n, w, bs, r = 384, 40, 16, 256
    q, k, v = _qkv(n, seed=9)
    model = ModelMask(_recipe(n, w, device=torch.device(DEVICE), batch_size=1))
    seen = model.block_pairs(bs, DEVICE) > 0  # (M, M) blocks each query block sees
    keep = _random_keep(1, 4, n // bs, n // bs, seed=10) & seen
    t = torch.arange(n, device=DEVICE)
    want = keep.clone()
    want[:, :, r // bs :] = seen[r // bs :]
    token_keep = _token_mask(want, bs, bs, n) & ((t[:, None] - t[None, :]) < w)
    k0 = (r - w + 1) // 128 * 128
    rows = rows_of(model.block_mask(DEVICE), r, k0, window_mask_mod(w, r, k0))
    assert rows.seq_lengths == (n - r, n - k0)
    expected = _masked_attention(q, k, v, token_keep, 0.3)
    for lists in (None, flex.keep_lists(keep, all_partial=True)):
        out = flex_block_sparse_attention(
            q, k, v, keep, bs, 0.3, _window(w), lists, whole=(r, k0, rows)
        )
        torch.testing.assert_close(out, expected, **TOL)
        assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D): the layout read next
    # every row whole (r = 0): the model's mask alone, whatever the selection
    every = rows_of(model.block_mask(DEVICE), 0, 0, window_mask_mod(w))
    out = flex_block_sparse_attention(q, k, v, keep, bs, 0.3, _window(w), whole=(0, 0, every))
    window = _token_mask(seen.expand(1, 4, -1, -1), bs, bs, n) & ((t[:, None] - t[None, :]) < w)
    torch.testing.assert_close(out, _masked_attention(q, k, v, window, 0.3), **TOL)
    assert out.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="not a multiple of the block"):
        flex_block_sparse_attention(q, k, v, keep, bs, 0.3, _window(w), whole=(r + 8, k0, rows))


@pytest.mark.parametrize(
    "name, params, apart",
    [
        ("quest", {}, 2),
        ("coarse_magnitude", {}, 2),
        ("random_block", {}, 2),
        ("cab", {}, 2),
        ("cab", {"graph": "directed", "selection": "causal"}, 2),
        ("cab", {"candidates": 4.0}, 0),  # cab_quest: outside its candidates -inf
        ("xattention", {"stride": 8}, 0),  # past its threshold -inf, whatever the budget
    ],
)
def test_a_window_layer_s_whole_rows_run_apart_in_a_prefill(tiny_gemma3, name, params, apart):
    """A block policy's prefill of Gemma 3 whose budget reaches the window runs its window
    layers' rows past that reach as the model's mask (both window layers; the global one
    in blocks) where the policy keeps what fits its budget: the first layer's attention
    (the same input, the same selection) as the keep-mask's and in tiles of the block;
    the logits and the sparsity too where no later selection turns on float noise (CAB's
    max-L2 coarsening meets near-ties in a random model: a 1e-7 change flips a block)."""
    from attnlab import policies, sparse

    ids = torch.randint(0, 100, (1, 384), generator=torch.Generator().manual_seed(11))
    policy = policies.make(name, block_size=16, **params)
    assert policy.keeps_what_fits() == (apart > 0)
    runs = {
        "flex": sparse.SparseRun(policy, 0.8, backend="flex", whole_prompt=True),
        "block": sparse.SparseRun(policy, 0.8, backend="flex", tiles="block", whole_prompt=True),
        "eager": sparse.SparseRun(policy, 0.8, backend="eager", whole_prompt=True),
    }
    logits, first = {}, {}
    attention = tiny_gemma3.model.layers[0].self_attn
    for backend, run in runs.items():
        hook = attention.register_forward_hook(lambda m, i, o, b=backend: first.update({b: o[0]}))
        try:
            with run, torch.no_grad():
                logits[backend] = tiny_gemma3(input_ids=ids.to(tiny_gemma3.device)).logits
        finally:
            hook.remove()
    taken = {k: n for k, n in runs["flex"].kernels.items() if "whole tiles apart" in k}
    assert sum(taken.values()) == apart
    assert not any("whole tiles apart" in k for k in runs["block"].kernels)
    for other in ("block", "eager"):
        torch.testing.assert_close(first["flex"], first[other], rtol=1e-5, atol=1e-5)
        if name in ("quest", "random_block"):
            torch.testing.assert_close(logits["flex"], logits[other], rtol=1e-5, atol=1e-5)
    sparsity = {r.recorder.achieved_sparsity for r in runs.values()}
    assert len(sparsity) == 1 or name not in ("quest", "random_block")
    assert min(sparsity) > 0.5
    with pytest.raises(ValueError, match="tiles must be"):
        sparse.SparseRun(policy, 0.8, tiles="window tile")


def test_auto_tiles_take_whole_tiles_apart_under_64_token_blocks_alone(tiny_gemma3):
    """``tiles="auto"`` (the default): a 16-token-block policy takes its window layers'
    whole tiles apart, a 64-token-block one runs them in tiles of the block, unless told
    ``tiles="whole"`` (at 50% both may keep a whole window tile)."""
    from attnlab import policies, sparse
    from attnlab.windows import tile_form

    assert [tile_form("auto", b) for b in (16, 32, 64, 128)] == ["whole"] * 2 + ["block"] * 2
    assert tile_form("window", 16) == "window" and tile_form("whole", 64) == "whole"
    ids = torch.randint(0, 100, (1, 384), generator=torch.Generator().manual_seed(13))
    apart = {}
    for bs, tiles in [(16, "auto"), (64, "auto"), (64, "whole")]:
        quest = policies.make("quest", block_size=bs)
        run = sparse.SparseRun(quest, 0.5, backend="flex", tiles=tiles)
        with run, torch.no_grad():
            tiny_gemma3(input_ids=ids.to(tiny_gemma3.device))
        apart[bs, tiles] = sum(n for k, n in run.kernels.items() if "whole tiles apart" in k)
    assert apart == {(16, "auto"): 2, (64, "auto"): 0, (64, "whole"): 2}


def test_whole_rows_only_where_a_model_tile_may_keep_what_it_sees():
    """``windows.whole_rows``: under a 100-key window over 1024 tokens, blocks of 16 at 50%
    (rows past about 230 keep their window) take whole rows apart; not at 95% (no row's
    budget reaches it), nor blocks as tall as the model's tiles, nor a causal mask."""
    from tests.test_windows import _recipe

    from attnlab.masks import ModelMask
    from attnlab.windows import whole_rows

    mask = ModelMask(_recipe(1024, 100, device=torch.device(DEVICE), batch_size=1))
    # rows past 229 keep their window (16 + 99 keys within half of their position): the
    # tiles from row 256 wholly, whose keys start at 157, in the tile from 128
    r, k0, rows = whole_rows(mask, 16, 0.5, DEVICE)
    assert (r, k0, rows.BLOCK_SIZE, rows.seq_lengths) == (256, 128, (128, 128), (768, 896))
    assert whole_rows(mask, 16, 0.5, DEVICE)[2] is rows  # once per forward pass
    assert whole_rows(mask, 16, 0.95, DEVICE) is None
    assert whole_rows(mask, 128, 0.5, DEVICE) is None
    from transformers.masking_utils import causal_mask_function

    causal = ModelMask(
        _recipe(1024, 100, local_size=None, mask_function=causal_mask_function, batch_size=1)
    )
    assert whole_rows(causal, 16, 0.5, DEVICE) is None


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"),
    reason="needs CUDA and TRITON_INTERPRET=0",
)
@pytest.mark.parametrize(
    "name, params", [("quest", {}), ("quest", {"dense_layers": 1}), ("cab", {})]
)
def test_on_the_gpu_whole_window_tiles_keep_the_logits_of_tiles_of_the_block(name, params):
    """On CUDA (compiled flex, the fused selection, transformers' own BlockMask of the
    window) a prefill taking its window layers' whole tiles apart (the fused kernels
    choosing for the rows before them alone; also in a window layer Quest leaves dense)
    gives the logits and the sparsity of the same selection in tiles of the block."""
    from tests.tiny_models import tiny_gemma3

    from attnlab import policies, sparse

    model = tiny_gemma3().cuda()
    ids = torch.randint(0, 100, (1, 384), generator=torch.Generator().manual_seed(12))
    policy = policies.make(name, block_size=16, **params)
    runs = {t: sparse.SparseRun(policy, 0.8, tiles=t) for t in ("whole", "block")}
    logits = {}
    for tiles, run in runs.items():
        with run, torch.no_grad():
            logits[tiles] = model(input_ids=ids.cuda()).logits
    apart = sum(n for k, n in runs["whole"].kernels.items() if "whole tiles apart" in k)
    assert apart == 2  # both window layers
    torch.testing.assert_close(logits["whole"], logits["block"], rtol=1e-4, atol=1e-4)
    sparsity = {r.recorder.achieved_sparsity for r in runs.values()}
    assert len(sparsity) == 1


def test_launch_settings_go_with_their_tiles_alone():
    """At head dim 256 alone (where they were measured) 16-row tiles launch in
    ``SMALL_TILE_WARPS`` warps and flex's default tiles take fewer stages; other tiles and
    head dims launch as flex's defaults."""
    assert flex.kernel_options(16, 16, 256) == {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2}
    for d in (16, 64, 128):
        assert flex.kernel_options(16, 16, d) == {"BLOCK_M": 16, "BLOCK_N": 16}
    assert "num_warps" not in flex.kernel_options(64, 16, 256)
    assert flex.kernel_options(128, 64, 256) == {"BLOCK_N": 64}
    assert flex.kernel_options(128, 128, 256) == flex.dense_options(256) == {"num_stages": 2}
    assert flex.kernel_options(128, 128, 128) is None
    assert flex.dense_options(128) is None and flex.dense_options(192) is None


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"),
    reason="needs CUDA and TRITON_INTERPRET=0",
)
@pytest.mark.parametrize("d", [256])
def test_on_the_gpu_launch_settings_give_the_default_s_output_bit_for_bit(d):
    """The compiled kernel in ``kernel_options``' warps and ``dense_options``' stages
    gives exactly the output of flex's defaults for the same tiles: block-sparse
    selections of 16- and 128-token blocks and a sliding window in 128-token blocks, bf16,
    GQA."""
    from torch.nn.attention.flex_attention import create_block_mask

    from attnlab.windows import window_mask_mod

    n, scaling = 1024, d**-0.5
    q, k, v = (x.bfloat16() for x in _qkv(n, heads=4, kv_heads=1, d=d, seed=3))
    g = torch.Generator().manual_seed(4)
    keep = (torch.rand(1, 4, n // 16, n // 16, generator=g) < 0.2).to(DEVICE)
    blocks = block_mask_from_keep(keep, 16, n)
    tuned = flex.run_flex(q, k, v, blocks, scaling, flex.kernel_options(16, 16, d))
    default = flex.run_flex(q, k, v, blocks, scaling, {"BLOCK_M": 16, "BLOCK_N": 16})
    assert flex.kernel_options(16, 16, d)["num_warps"] == 2 and torch.equal(tuned, default)
    window = create_block_mask(window_mask_mod(100), 1, 1, n, n, device=DEVICE, BLOCK_SIZE=128)
    tuned = flex.run_flex(q, k, v, window, scaling, flex.dense_options(d))
    assert torch.equal(tuned, flex.run_flex(q, k, v, window, scaling))
    blocks = block_mask_from_keep(keep[..., ::8, ::8], 128, n)  # XAttention's blocks
    tuned = flex.run_flex(q, k, v, blocks, scaling, flex.kernel_options(128, 128, d))
    assert torch.equal(tuned, flex.run_flex(q, k, v, blocks, scaling))
