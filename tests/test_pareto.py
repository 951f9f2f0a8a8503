"""Perplexity under a policy, its interval, corpus haystacks, policy variants, and the
curvature-against-weight table, on the real SmolLM2 and real text."""

import math

import numpy as np
import pytest
import torch

from attnlab import attention, curvature, models, niah, pareto, policies, tables
from attnlab.errors import UserError


def _chunk(sharded, i=0):
    _, _, chunks, _ = sharded
    return torch.tensor([chunks[i]["tokens"]], dtype=torch.long)


def test_full_attention_perplexity_equals_the_models_own_loss(smollm2, sharded):
    model, _, _ = smollm2
    ids = _chunk(sharded)
    model.set_attn_implementation("sdpa")  # the model's own attention, not attnlab's
    try:
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=ids).loss.item()
    finally:
        attention.install(model)
    nll, tokens, run, seconds = pareto.chunk_pass(model, ids, policies.make("full"), 0.0)
    assert tokens == ids.shape[1] - 1 and seconds > 0
    assert run.recorder.achieved_sparsity == 0.0
    assert math.exp(nll / tokens) == pytest.approx(math.exp(loss), rel=1e-4)


def test_cache_regime_scores_the_continuation_with_the_models_own_logits(smollm2, sharded):
    """Full attention in the cache regime: the NLL of the tokens after the dense context
    under the model's own attention; a sparse policy acts on those rows alone."""
    model, _, _ = smollm2
    ids = _chunk(sharded)
    t = ids.shape[1]
    first = pareto.context_length(t, 0.5)
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, first:-1].double()
    finally:
        attention.install(model)
    expected = torch.nn.functional.cross_entropy(logits, ids[0, first + 1 :], reduction="sum")
    nll, tokens, run, seconds = pareto.chunk_pass(
        model, ids, policies.make("full"), 0.0, regime="cache"
    )
    assert abs(first - t / 2) <= 0.5 and tokens == t - first - 1 and seconds > 0
    assert nll == pytest.approx(float(expected), rel=1e-4)
    nll_s, _, run_s, _ = pareto.chunk_pass(
        model, ids, policies.make("streamingllm"), 0.5, regime="cache"
    )
    assert abs(run_s.recorder.achieved_sparsity - 0.5) < 0.01 and nll_s > nll
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        pareto.context_length(t, 1.0)


def test_sparse_pass_reaches_its_sparsity_and_repeats_agree(smollm2, sharded):
    model, _, _ = smollm2
    _, _, chunks, _ = sharded
    tokens = np.array([c["tokens"] for c in chunks[:2]])
    policy = policies.make("streamingllm")
    rows = pareto.score_chunks(model, tokens, policy, 0.5, repeats=2, chunk_ids=[7, 8])
    assert [r["chunk"] for r in rows] == [7, 8]
    full = pareto.score_chunks(model, tokens, policies.make("full"), 0.0, repeats=1)
    for r, f in zip(rows, full, strict=True):
        assert r["tokens"] == f["tokens"] == tokens.shape[1] - 1
        assert abs(r["achieved_sparsity"] - 0.5) < 0.01
        assert r["nll_sum"] > f["nll_sum"]  # half the keys masked: the model predicts worse
        assert r["seconds_per_token"] > 0
    again = pareto.chunk_pass(model, torch.tensor(tokens[:1]), policy, 0.5)
    assert again[0] == rows[0]["nll_sum"]


def test_perplexity_is_token_weighted_and_its_interval_resamples_chunks():
    nll, tok = np.array([10.0, 30.0]), np.array([10, 10])
    assert pareto.perplexity(nll, tok) == pytest.approx(math.exp(2.0))
    lo, hi = pareto.perplexity_interval(nll, tok, resamples=500)
    assert math.exp(1.0) <= lo < math.exp(2.0) < hi <= math.exp(3.0)
    assert pareto.perplexity_interval(nll[:1], tok[:1]) == pytest.approx((math.e, math.e))


def _score_table(path, policy, nll, tokens, sparsity=0.0):
    """A pareto-score table as `attnlab pareto-score` writes it (one row per chunk)."""
    n = len(nll)
    rows = [
        {
            "chunk": i,
            "nll_sum": float(nll[i]),
            "tokens": int(tokens[i]),
            "achieved_sparsity": sparsity,
            "seconds_per_token": 1e-3,
            "model": "m",
            "regime": "prefill",
            "policy": policy,
            "target_sparsity": sparsity,
            "feasible": True,
            "device": "cpu",
        }
        for i in range(n)
    ]
    tables.write(rows, path)
    return str(path)


def test_paired_ratio_excludes_one_where_every_chunk_is_worse(tmp_path):
    """Chunks that differ a lot in difficulty (NLL per token 1.0 to 3.5) and a policy that
    costs every chunk 0.05 nats per token: the two perplexities' own intervals overlap,
    the paired ratio's interval is exp(0.05) exactly and excludes 1."""
    per_token = np.linspace(1.0, 3.5, 12)
    tokens = np.full(12, 100)
    paths = [
        _score_table(tmp_path / "full.parquet", "full", per_token * tokens, tokens),
        _score_table(tmp_path / "h2o.parquet", "h2o", (per_token + 0.05) * tokens, tokens, 0.5),
    ]
    by = {r["policy"]: r for r in pareto.collect(paths, resamples=1000, seed=0)}
    full, h2o = by["full"], by["h2o"]
    assert h2o["ppl_lo"] < full["ppl_hi"]  # the marginal intervals overlap
    assert h2o["ppl_ratio"] == pytest.approx(math.exp(0.05))
    assert h2o["ratio_lo"] == pytest.approx(math.exp(0.05))  # equal tokens: every draw
    assert h2o["ratio_lo"] > 1
    assert (full["ppl_ratio"], full["ratio_lo"], full["ratio_hi"]) == (1.0, 1.0, 1.0)
    # A policy that helps half the chunks and hurts the other half: the interval holds 1.
    mixed = per_token + np.tile([0.2, -0.2], 6)
    paths.append(_score_table(tmp_path / "cab.parquet", "cab", mixed * tokens, tokens, 0.5))
    cab = {r["policy"]: r for r in pareto.collect(paths, resamples=1000)}["cab"]
    assert cab["ratio_lo"] < 1 < cab["ratio_hi"]


def test_corpus_haystack_hides_the_needle_in_corpus_text(smollm2, sharded):
    _, tok, _ = smollm2
    _, _, chunks, _ = sharded
    stream = np.concatenate([c["tokens"] for c in chunks])
    p = niah.make_prompt(tok, 400, 0.5, 0, 3, haystack=stream)
    assert len(p.input_ids) == 400
    assert tok.decode([p.input_ids[i] for i in p.needle_positions]).strip() == p.key
    # the filler after the needle is a contiguous stretch of the corpus
    after = p.input_ids[p.needle_positions[-1] + 30 : p.needle_positions[-1] + 60]
    starts = np.flatnonzero(stream[: len(stream) - len(after)] == after[0])
    assert any((stream[s : s + len(after)] == after).all() for s in starts)
    assert p == niah.make_prompt(tok, 400, 0.5, 0, 3, haystack=stream)
    other = niah.make_prompt(tok, 400, 0.5, 1, 3, haystack=stream)
    assert other.input_ids[30:60] != p.input_ids[30:60]  # another sample, another stretch
    noise = niah.make_prompt(tok, 400, 0.5, 0, 3)
    assert noise.key == p.key and noise.input_ids != p.input_ids
    with pytest.raises(UserError, match="too few for a 400-token haystack"):
        niah.make_prompt(tok, 400, 0.5, 0, 3, haystack=stream[:100])


def test_a_variant_is_its_base_policy_with_other_parameters():
    cab = policies.make("cab_lam30", base="cab", block_size=16, lam=0.3)
    assert type(cab) is policies.REGISTRY["cab"] and cab.lam == 0.3 and cab.name == "cab"
    assert "base" not in cab.params()
    with pytest.raises(UserError, match="unknown policy 'magic'"):
        policies.make("cab_x", base="magic")


def test_block_pairs_are_the_coarse_graph_of_a_niah_prompt(smollm2):
    model, tok, info = smollm2
    p = niah.make_prompt(tok, 200, 0.5, 0, 0)
    cols = curvature.block_pairs(model, p.input_ids, 3, 16, needle_positions=p.needle_positions)
    m = -(-200 // 16)
    assert len(cols["weight"]) == info.n_heads * m * (m + 1) // 2
    # softmax adjacency: each query block's weights over its causal key blocks sum to 1
    sums = np.zeros((info.n_heads, m))
    np.add.at(sums, (cols["head"], cols["q_block"]), cols["weight"])
    assert np.allclose(sums, 1.0, atol=1e-5)
    needle_blocks = {i // 16 for i in p.needle_positions}
    assert set(cols["k_block"][cols["needle"]]) == needle_blocks
    assert np.isfinite(cols["curvature"]).all()
    assert (cols["diagonal"] == (cols["q_block"] == cols["k_block"])).all()


def test_asking_for_a_gpu_that_is_not_there_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert models.pick_device("auto") == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        models.pick_device("cuda")
