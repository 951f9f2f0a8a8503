"""FlexAttention over a block selection equals masked softmax attention with the same mask."""

from types import SimpleNamespace

import pytest
import torch

from attnlab.flex import (
    block_mask_from_keep,
    flex_attention_from_selection,
    flex_block_sparse_attention,
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
