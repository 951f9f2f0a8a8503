"""The regimes as objects: where a policy acts, what is recorded, how a block policy
chooses, and how the rows are labelled, asked of the regime rather than of its name."""

import pytest

from attnlab import policies, regimes, sparse


def test_where_a_policy_acts_in_each_regime():
    cache, prefill = regimes.CACHE, regimes.PREFILL
    # the prompt's prefill (a layer's first call): dense in the cache regime
    assert not cache.acts(first_call=True, decode="dense")
    assert prefill.acts(first_call=True, decode="dense")
    # the decode steps: under the policy in the cache regime, dense in the prefill one
    # unless the run asks for the policy there
    assert cache.acts(first_call=False, decode="dense")
    assert not prefill.acts(first_call=False, decode="dense")
    assert prefill.acts(first_call=False, decode="policy")
    # recall: every generated token's row, or the prompt's last row alone
    assert cache.records_recall(first_call=False) and prefill.records_recall(first_call=True)
    assert not prefill.records_recall(first_call=False)


def test_selection_and_labels_follow_the_regime():
    cab, h2o = policies.make("cab"), policies.make("h2o")
    assert regimes.PREFILL.selection(cab, whole_prompt=True) == "prompt"  # CAB's own form
    assert regimes.PREFILL.selection(cab, whole_prompt=False) == "causal"  # perplexity
    assert regimes.CACHE.selection(cab, whole_prompt=True) == "causal"  # per row
    assert regimes.CACHE.decode_mode("dense") == "policy"
    assert regimes.PREFILL.decode_mode("dense") == "dense"
    assert regimes.PREFILL.extends(h2o) and not regimes.CACHE.extends(h2o)
    assert not regimes.PREFILL.extends(cab)


def test_a_run_takes_a_regime_by_name_and_refuses_an_unknown_one():
    run = sparse.SparseRun(policies.make("cab"), 0.9, regime="cache")
    assert run.regime is regimes.CACHE and str(run.regime) == "cache"
    assert sparse.SparseRun(policies.make("cab"), regime=regimes.PREFILL).regime is regimes.PREFILL
    with pytest.raises(ValueError, match="regime must be one of"):
        sparse.SparseRun(policies.make("cab"), regime="decode")
