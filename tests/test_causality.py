"""Causality of every policy in both regimes, on the real SmolLM2-135M: changing token p
leaves every logit before p unchanged (DESIGN: Causality)."""

import pytest
import torch

from attnlab import decoding, policies, sparse

T, P = 112, 80  # sequence length; the changed position (prefill regime)
PROMPT, P_DECODE = 96, 104  # cache regime: the dense prompt, then a changed decode token
# Small blocks so that the block policies have several blocks (and a ragged last one).
PARAMS = {
    "cab": {"block_size": 16},
    "coarse_magnitude": {"block_size": 16},
    "random_block": {"block_size": 16},
    "quest": {"block_size": 16},
    "xattention": {"block_size": 32, "stride": 8},
    "snapkv": {"window": 8},
}
# CAB's ablation variants (workflow_config.yaml's policies.cab_*), causal in each regime too
VARIANTS = {
    "cab_plan": {"adjacency": "dot", "graph": "rowsum"},
    "cab_directed": {"graph": "directed"},
    "cab_query": {"query": "row"},
}
NAMES = sorted(policies.REGISTRY) + sorted(VARIANTS)
ATOL = 1e-5


def _policy(name):
    if name in VARIANTS:
        return policies.make("cab", **PARAMS["cab"], **VARIANTS[name])
    return policies.make(name, **PARAMS.get(name, {}))


def _ids(p=P):
    ids = torch.randint(200, 5000, (1, T), generator=torch.Generator().manual_seed(7))
    other = ids.clone()
    other[0, p] = (ids[0, p] + 17) % 5000 + 200
    return ids, other


def _prefill_logits(model, ids, name, backend="eager"):
    run = sparse.SparseRun(_policy(name), 0.75, backend=backend)
    with torch.inference_mode(), run:
        return model(ids, use_cache=False).logits[0]  # (T, V)


def _cache_logits(model, ids, name, prompt=PROMPT):
    """A dense prefill of ``prompt`` tokens, then the rest teacher-forced one token at a
    time under the policy (the cache regime): logits of every decode row."""
    run = sparse.SparseRun(_policy(name), 0.75, regime="cache")
    cache, _ = decoding.prefill(model, ids[:, :prompt], run)
    rows = []
    with torch.inference_mode(), run:
        for t in range(prompt, T):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows), run  # (T - prompt, V)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_regime_rows_before_a_changed_token_keep_their_logits(smollm2, name):
    model, _, _ = smollm2
    ids, other = _ids()
    a, b = _prefill_logits(model, ids, name), _prefill_logits(model, other, name)
    torch.testing.assert_close(a[:P], b[:P], rtol=0, atol=ATOL)
    if name != "full":  # the change is seen from p on: the test can fail
        assert not torch.allclose(a[P:], b[P:], atol=1e-3)


def _continuation_logits(model, ids, name, prompt=PROMPT):
    """The same dense prefill, then the rest in one teacher-forced pass under the policy
    (the cache regime's perplexity): logits of every row after the prompt."""
    run = sparse.SparseRun(_policy(name), 0.75, regime="cache")
    cache, _ = decoding.prefill(model, ids[:, :prompt], run)
    with torch.inference_mode(), run:
        out = model(ids[:, prompt:], past_key_values=cache, use_cache=True)
    return out.logits[0], run


@pytest.mark.parametrize("name", NAMES)
def test_cache_regime_rows_before_a_changed_token_keep_their_logits(smollm2, name):
    model, _, _ = smollm2
    ids, other = _ids(P_DECODE)
    (a, run), (b, _) = _cache_logits(model, ids, name), _cache_logits(model, other, name)
    n = P_DECODE - PROMPT  # decode rows before the changed token
    torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=ATOL)
    assert not torch.allclose(a[n:], b[n:], atol=1e-3)
    if name != "full":
        assert run.achieved_sparsity > 0.5  # the policy acted on the decode rows
    # one multi-row pass is token-by-token decoding (float noise of the batched kernels
    # apart): what the cache regime's perplexity rests on
    c, multi = _continuation_logits(model, ids, name)
    torch.testing.assert_close(c, a, rtol=0, atol=1e-3)
    assert multi.achieved_sparsity == pytest.approx(run.achieved_sparsity, abs=1e-12)


BLOCK = [n for n, cls in sorted(policies.REGISTRY.items()) if cls.level == "block"]


@pytest.mark.parametrize("name", BLOCK)
def test_flex_prefill_rows_before_a_changed_token_keep_their_outputs(smollm2, name):
    """The FlexAttention path (query-block selections) is causal too."""
    model, _, _ = smollm2
    ids, other = _ids()
    a = _prefill_logits(model, ids, name, backend="flex")
    b = _prefill_logits(model, other, name, backend="flex")
    torch.testing.assert_close(a[:P], b[:P], rtol=0, atol=ATOL)
