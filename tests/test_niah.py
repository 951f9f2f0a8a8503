"""Passkey prompts: exact length, needle where asked, refusals, and scoring of a real model."""

import pytest

from attnlab import niah, policies
from attnlab.errors import UserError


@pytest.mark.parametrize("length", [300, 777])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_exact_length_and_tracked_needle(smollm2, length, depth):
    _, tok, _ = smollm2
    p = niah.make_prompt(tok, length, depth, sample=0, seed=7)
    assert len(p.input_ids) == length
    assert tok.decode([p.input_ids[i] for i in p.needle_positions]).strip() == p.key
    before = tok.decode(p.input_ids[p.needle_positions[0] - 5 : p.needle_positions[0]])
    assert before.rstrip().endswith("pass key is")
    rel = p.needle_positions[0] / length
    assert abs(rel - depth) < 0.2


def test_needle_moves_with_depth_and_keys_are_seeded(smollm2):
    _, tok, _ = smollm2
    pos = [niah.make_prompt(tok, 600, d, 0, 1).needle_positions[0] for d in (0.0, 0.5, 1.0)]
    assert pos[0] < pos[1] < pos[2]
    a, b = niah.make_prompt(tok, 600, 0.5, 0, 1), niah.make_prompt(tok, 600, 0.5, 1, 1)
    assert a.key == niah.make_prompt(tok, 600, 0.5, 0, 1).key and a.key != b.key


def test_prompt_longer_than_context_is_refused(smollm2):
    _, tok, info = smollm2
    with pytest.raises(UserError, match="exceeds the model's context of 8192"):
        niah.make_prompt(tok, 9000, 0.5, 0, 0, info.max_positions)
    with pytest.raises(UserError, match="too short"):
        niah.make_prompt(tok, 20, 0.5, 0, 0)


def test_score_prompt_retrieves_with_full_attention_and_records_diagnostics(gemma3):
    model, tok, _ = gemma3
    p = niah.make_prompt(tok, 400, 0.5, 0, 0)
    row = niah.score_prompt(model, tok, p, policies.make("full"), 0.0)
    assert row["correct"] and p.key in niah.digits(row["generated"])
    assert row["needle_kept"] == 1.0 and row["achieved_sparsity"] == 0.0
    row = niah.score_prompt(model, tok, p, policies.make("streamingllm"), 0.95)
    assert row["needle_kept"] == 0.0  # the needle sits mid-prompt: outside sinks and window
    assert row["achieved_sparsity"] > 0.9
