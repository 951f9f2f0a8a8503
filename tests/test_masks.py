"""The model's mask kept as a recipe: counting its pairs from a BlockMask (the CUDA path)
equals counting the dense mask, and a BlockMask made from a dense mask shows its pairs."""

import torch
from torch.nn.attention.flex_attention import create_block_mask

from attnlab.masks import _block_mask_of, _block_mask_pairs

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
