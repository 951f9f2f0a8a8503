"""The model's mask kept as a recipe: counting its pairs from a BlockMask (the CUDA path)
equals counting the dense mask, per block too (on CUDA in a block policy's prefill), and a
BlockMask made from a dense mask shows its pairs."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from attnlab.blocks import visible_block_pairs
from attnlab.masks import (
    ModelMask,
    _block_mask_of,
    _block_mask_pairs,
    causal_rows,
    pairs_per_block,
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
