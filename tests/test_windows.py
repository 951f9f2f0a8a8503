"""A sliding-window prefill's mask by formula: its rows, keys per key block, pairs per
block pair, pair count and the budget kernel's bands equal what the dense mask gives,
and only a plain, unpadded sliding window is read as one."""

import sys
from pathlib import Path

import pytest
import torch
from transformers.masking_utils import (
    causal_mask_function,
    sliding_window_causal_mask_function,
)

from attnlab import masks
from attnlab.blocks import visible_block_pairs, visible_per_block
from attnlab.kernels.budget import row_bands, window_bands
from attnlab.masks import ModelMask
from attnlab.windows import (
    window_block_counts,
    window_block_pairs,
    window_of,
    window_pair_count,
    window_rows,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_gemma3  # noqa: E402

# (tokens, window, block): ragged last blocks, windows shorter and longer than a block,
# a window of one key, one a token short of the prompt
SHAPES = [(50, 24, 16), (100, 7, 16), (33, 32, 8), (127, 126, 16), (300, 40, 128), (90, 5, 4)]


def _dense(t: int, w: int) -> torch.Tensor:
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (k <= q) & (k > q - w)


def _recipe(t: int, w: int, **change) -> dict:
    recipe = dict(
        local_size=w, q_length=t, kv_length=t, q_offset=0, kv_offset=0, attention_mask=None,
        mask_function=sliding_window_causal_mask_function(w), device=torch.device("cpu"),
    )  # fmt: skip
    return {**recipe, **change}


@pytest.mark.parametrize("t, w, bs", SHAPES)
def test_window_formulas_equal_the_dense_mask(t, w, bs):
    dense = _dense(t, w)
    assert torch.equal(window_block_pairs(t, bs, w), visible_block_pairs(dense, bs))
    assert window_pair_count(t, w) == int(dense.sum())
    starts = torch.arange(0, t, bs)
    ends = (starts + bs - 1).clamp(max=t - 1)
    want = visible_per_block((dense[starts] | dense[ends])[None, None], bs)
    assert torch.equal(window_block_counts(starts, ends, bs, t, w), want)
    g = torch.Generator().manual_seed(t)
    a, b = torch.randint(0, t, (25,), generator=g), torch.randint(0, t, (25,), generator=g)
    want = visible_per_block((dense[a] | dense[b])[None, None], bs)
    assert torch.equal(window_block_counts(a, b, bs, t, w), want)  # any two rows
    assert torch.equal(window_rows(a, t, w)[0, 0], dense[a])


@pytest.mark.parametrize("t, w, bs", SHAPES)
def test_window_bands_equal_those_read_from_the_counts(t, w, bs):
    dense = _dense(t, w)
    starts = torch.arange(0, t, bs)
    ends = (starts + bs - 1).clamp(max=t - 1)
    count = visible_per_block((dense[starts] | dense[ends])[None, None], bs)
    for most in (12, 2):
        got, want = window_bands(t, bs, w, "cpu", most), row_bands(count, most)
        assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_only_a_plain_sliding_window_is_read_as_one():
    assert window_of(_recipe(50, 24)) == 24
    assert window_of(_recipe(50, 24, mask_function=causal_mask_function)) is None
    chunked = lambda b, h, q, k: (k <= q) & (k // 24 == q // 24)  # noqa: E731
    assert window_of(_recipe(50, 24, mask_function=chunked)) is None
    assert window_of(_recipe(50, 50)) is None  # as long as the prompt: causal
    assert window_of(_recipe(50, 24, q_offset=3)) is None
    assert window_of(_recipe(50, 24, kv_length=60)) is None
    assert window_of(_recipe(50, 24, local_size=None)) is None
    padded = torch.ones(1, 50, dtype=torch.long)
    padded[0, :4] = 0
    assert ModelMask(_recipe(50, 24, attention_mask=padded)).window() is None
    assert ModelMask(_recipe(50, 24, attention_mask=torch.ones(1, 50))).window() == 24


def test_a_model_s_window_mask_answers_by_formula_as_its_dense_mask(monkeypatch):
    """Gemma 3's sliding-window layers hand over a recipe read as a window; the mask's
    rows, counts and pairs then come from the formulas, equal to its dense mask's."""
    made = []

    def keep(**recipe):
        made.append(masks.ModelMask(recipe))
        return made[-1]

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = tiny_gemma3()  # installs the attnlab attention and its mask function
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "attnlab", keep)
    t = 70
    with torch.no_grad():
        model(torch.randint(0, 100, (1, t), generator=torch.Generator().manual_seed(2)))
    windows = [m for m in made if m.window() is not None]
    assert len(windows) == 1 and windows[0].window() == model.config.sliding_window
    mask = windows[0]
    dense = mask.dense()
    del mask.store["dense"]
    index = torch.tensor([0, 5, 40, t - 1])
    assert torch.equal(mask.rows(index), dense[:, :, index])
    starts = torch.arange(0, t, 16)
    ends = (starts + 15).clamp(max=t - 1)
    want = visible_per_block(dense[:, :, starts] | dense[:, :, ends], 16)
    assert torch.equal(mask.block_counts(starts, ends, 16), want)
    assert torch.equal(mask.block_pairs(16), visible_block_pairs(dense[0, 0], 16))
    assert "dense" not in mask.store  # none of them built it


def test_a_block_policy_s_prefill_under_the_window_s_formula_equals_the_pattern_s():
    """A block policy's FlexAttention prefill of Gemma 3 with the window's own mask_mod
    returns the logits it returns with the mask_mod read from the model's pattern."""
    from attnlab import policies, sparse

    model = tiny_gemma3()
    ids = torch.randint(0, 100, (1, 90), generator=torch.Generator().manual_seed(3))

    def logits():
        run = sparse.SparseRun(policies.make("quest", block_size=16), 0.8, backend="flex")
        with run, torch.no_grad():
            out = model(input_ids=ids).logits  # every row's
        assert run.kernels.get("flex block-sparse, model mask") == 2  # both window layers
        return out

    by_formula = logits()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelMask, "mask_mod", lambda self, device: self.block_mask(device).mask_mod)
        assert torch.equal(by_formula, logits())
    q, k = torch.arange(60)[:, None], torch.arange(60)[None, :]
    mask_mod = ModelMask(_recipe(60, 24)).mask_mod("cpu")
    assert torch.equal(mask_mod(0, 0, q, k), _dense(60, 24))
