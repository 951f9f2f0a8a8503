"""The model's mask kept as a recipe: counting its pairs from a BlockMask (the CUDA path)
equals counting the dense mask, per block too (on CUDA in a block policy's prefill), and a
BlockMask made from a dense mask shows its pairs."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from attnlab import masks
from attnlab.blocks import visible_block_pairs, visible_per_block
from attnlab.masks import (
    ModelMask,
    _block_mask_of,
    _block_mask_pairs,
    block_counts_of_block_mask,
    causal_block_counts,
    causal_rows,
    pairs_per_block,
    rows_of_block_mask,
    visible_mask,
)

T, WINDOW = 600, 300  # ragged against 128-token blocks; whole blocks inside the window


def window(b, h, q, kv):
    return (kv <= q) & (kv > q - WINDOW)


def _dense() -> torch.Tensor:
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return window(0, 0, q, kv)[None, None]  # (1, 1, T, T)


def test_pairs_from_a_block_mask_equal_the_dense_count():
    bm = create_block_mask(window, 1, None, T, T, device="cpu", _compile=False)
    assert bm.full_kv_num_blocks is not None and int(bm.full_kv_num_blocks.sum()) > 0
    assert _block_mask_pairs(bm) == int(_dense().sum()) == sum(min(q + 1, WINDOW) for q in range(T))


def test_a_block_mask_of_a_dense_mask_shows_its_pairs():
    dense = _dense()
    bm = _block_mask_of(dense)
    assert _block_mask_pairs(bm) == int(dense.sum())
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    zeros = torch.zeros_like(q)
    assert torch.equal(bm.mask_mod(zeros, zeros, q, kv), dense[0, 0])


@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_pairs_per_block_from_a_block_mask_equal_the_dense_count(block_size):
    """Whole blocks by their area, partial ones pair by pair, at any block size dividing
    the BlockMask's: equal to counting the dense mask, ragged edges and window included."""
    dense = _dense()
    want = visible_block_pairs(dense[0, 0], block_size)
    bm = create_block_mask(window, 1, None, T, T, device="cpu", _compile=False)
    assert torch.equal(pairs_per_block(bm, block_size), want)
    assert torch.equal(pairs_per_block(_block_mask_of(dense), block_size), want)  # all partial
    assert int(want.sum()) == int(dense.sum())


def test_causal_rows_are_the_causal_mask_rows():
    index = torch.tensor([0, 5, 63, 64, 599])
    assert torch.equal(causal_rows(index, T), visible_mask(None, T, T, "cpu")[:, :, index])


def _query_blocks(block_size):
    starts = torch.arange(0, T, block_size)
    return starts, (starts + block_size - 1).clamp(max=T - 1)


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("keys_at_once", [masks.KEYS_AT_ONCE, 1000])
def test_rows_and_block_counts_read_on_the_listed_blocks_equal_the_dense_mask(
    block_size, keys_at_once, monkeypatch
):
    """A query block's rows and the keys its first or last row sees per key block, read
    through the BlockMask's lists alone (the window's, and one made from a dense mask with
    a padded batch row), in one step or in steps of a few rows: the dense mask's, ragged
    edges included."""
    monkeypatch.setattr(masks, "KEYS_AT_ONCE", keys_at_once)
    starts, ends = _query_blocks(block_size)
    padded = _dense().expand(2, 1, T, T).clone()
    padded[1, :, :, :40] = False  # the second row's first 40 keys are padding
    bms = [
        (create_block_mask(window, 1, None, T, T, device="cpu", _compile=False), _dense()),
        (_block_mask_of(padded), padded),
    ]
    for bm, dense in bms:
        for index in (starts, ends, torch.tensor([T - 1])):
            assert torch.equal(rows_of_block_mask(bm, index), dense[:, :, index])
        want = visible_per_block(dense[:, :, starts] | dense[:, :, ends], block_size)
        got = block_counts_of_block_mask(bm, starts, ends, block_size, store={})
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_size", [16, 64])
def test_causal_block_counts_are_the_causal_rows_counts(block_size):
    starts, ends = _query_blocks(block_size)
    want = visible_per_block(causal_rows(starts, T) | causal_rows(ends, T), block_size)
    assert torch.equal(causal_block_counts(starts, ends, block_size, T), want)


def _quest_prefill_on_cuda():
    """Quest's prefill of a tiny Gemma 3 on CUDA (its two window layers through the fused
    selection)."""
    from tests.tiny_models import tiny_gemma3

    from attnlab import decoding, policies, sparse

    model = tiny_gemma3().cuda()
    ids = torch.randint(0, 5000, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    run = sparse.SparseRun(policies.make("quest", block_size=16), 0.8)
    decoding.prefill(model, ids, run)
    assert run.kernels.get("flex block-sparse, model mask, fused selection") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the pattern's path)")
def test_a_flex_prefill_counts_the_pattern_as_the_dense_mask(monkeypatch):
    """On CUDA a block policy's prefill counts the window's pairs per block from
    transformers' BlockMask; the count equals the dense mask's."""
    checked = []
    pairs = ModelMask.block_pairs

    def checked_pairs(self, block_size, device=None):
        out = pairs(self, block_size, device)
        assert torch.equal(out, visible_block_pairs(self.dense()[0, 0], block_size))
        checked.append(block_size)
        return out

    monkeypatch.setattr(ModelMask, "block_pairs", checked_pairs)
    _quest_prefill_on_cuda()
    assert checked == [16]  # asked once per forward pass, for every window layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the pattern's path)")
def test_a_flex_prefill_reads_the_window_rows_from_the_pattern(monkeypatch):
    """On CUDA a block policy's prefill reads the rows its selection needs from the
    window's pattern, with no (T, T) mask built; they equal the dense mask's rows."""
    checked = []
    rows = ModelMask.rows

    def checked_rows(self, index):
        assert "dense" not in self.store  # nothing on the path built it
        out = rows(self, index)
        want = self.dense()[:, :, index]
        del self.store["dense"]
        assert torch.equal(out, want)
        checked.append(index.numel())
        return out

    monkeypatch.setattr(ModelMask, "rows", checked_rows)
    _quest_prefill_on_cuda()
    assert 13 in checked and 1 in checked  # a query block's rows, the last row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the pattern's path)")
def test_a_flex_prefill_counts_each_query_blocks_keys_from_the_pattern(monkeypatch):
    """On CUDA a block policy's prefill counts the keys each query block's rows see per
    key block from the window's BlockMask; the counts equal the dense mask's."""
    checked = []
    counts = ModelMask.block_counts

    def checked_counts(self, starts, ends, block_size):
        out = counts(self, starts, ends, block_size)
        dense = self.dense()
        del self.store["dense"]
        want = visible_per_block(dense[:, :, starts] | dense[:, :, ends], block_size)
        assert torch.equal(out, want)
        checked.append(block_size)
        return out

    monkeypatch.setattr(ModelMask, "block_counts", checked_counts)
    _quest_prefill_on_cuda()
    assert checked == [16]  # once per forward pass, for every window layer
