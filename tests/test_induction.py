"""Induction heads: copy operations, a planted head found by the scorer, nulls that
destroy it, and head ablation on the real model."""

import numpy as np
import pytest
import torch

from attnlab import causal, induction, robustness
from attnlab.errors import UserError


def _prompt(segment, seq_len=40, shuffled=False, seed=0):
    tokens, q, s = induction._layout(
        np.asarray(segment), seq_len, 1, np.random.default_rng(seed), shuffled
    )
    return induction.InductionPrompt("random", len(segment), 0, shuffled, tokens, q, s)


def test_copy_operations_skip_bos_and_the_first_copy():
    p = _prompt([10, 11, 12, 13, 14])
    assert p.tokens[0] == 1 and p.queries.min() == 1 + 5  # BOS, then one whole copy
    assert (p.tokens[p.queries] == p.tokens[p.queries - 5]).all()
    assert (p.sources == p.queries - 4).all() and (p.sources < p.queries).all()
    assert len(p.queries) == 40 - 6
    names = _prompt([20, 21, 20, 22])  # token 20 twice in the segment: never a query
    assert 20 not in set(names.tokens[names.queries].tolist())


def test_lag_one_and_short_sequences_are_refused(smollm2):
    _, tok, _ = smollm2
    with pytest.raises(UserError, match="at least 2"):
        induction.make_prompts(tok, ["random"], [1, 4], 64, 2, 0)
    with pytest.raises(UserError, match="too short"):
        induction.make_prompts(tok, ["random"], [40], 64, 2, 0)
    with pytest.warns(UserWarning, match="previous-token heads"):  # lag 2: opt-in, warned
        induction.make_prompts(tok, ["random"], [2, 4], 64, 1, 0)


def _ideal_head(tokens: np.ndarray) -> torch.Tensor:
    """Attention of a perfect induction head: from t to the token after the latest
    earlier occurrence of tokens[t]; uniform over the past where there is none."""
    t_len = len(tokens)
    probs = torch.zeros(t_len, t_len)
    for t in range(t_len):
        earlier = [i for i in range(t - 1) if tokens[i] == tokens[t]]  # i + 1 < t
        if earlier:
            probs[t, earlier[-1] + 1] = 1.0
        else:
            probs[t, : t + 1] = 1.0 / (t + 1)
    return probs


def _planted_scores(prompts, layers=6, heads=4, planted=(3, 2)):
    """Per-prompt (layers, heads) scores with one ideal head; every other head uniform."""
    out = []
    for p in prompts:
        t_len = len(p.tokens)
        uniform = torch.tril(torch.ones(t_len, t_len))
        uniform = uniform / uniform.sum(-1, keepdim=True)
        scores = []
        for layer in range(layers):
            probs = uniform.expand(1, heads, t_len, t_len).clone()
            if layer == planted[0]:
                probs[0, planted[1]] = _ideal_head(p.tokens)
            scores.append(induction.prompt_scores(probs, [p])[0, 0].numpy())
        out.append(np.stack(scores))
    return np.stack(out)


def test_planted_head_gives_score_peak_and_bandwidth():
    rng = np.random.default_rng(0)
    prompts = [_prompt(rng.choice(np.arange(100, 200), 6, replace=False), seed=i) for i in range(5)]
    scores = _planted_scores(prompts)
    head = scores.mean(0)
    assert head[3, 2] == pytest.approx(1.0)
    assert np.delete(head.ravel(), 3 * 4 + 2).max() < 0.1
    profile = induction.layer_profile(head)
    peak, width = induction.peak_and_bandwidth(profile)
    assert peak == 3 / 6
    u, p = profile[0], profile[3]  # every non-planted layer has the same uniform profile
    assert np.allclose(np.delete(profile, 3), u)
    assert width == pytest.approx(p / (p - u) / 6)  # FWHM, linear between layers
    boot = robustness.bootstrap_profile(scores, "mean", 0.9, 200, 0)
    assert boot["peak_depth_ci"] == [0.5, 0.5]
    top = induction.layer_profile(head, "top", 0.9)
    assert np.argmax(top) == 3


def test_shuffled_antecedent_destroys_the_planted_signal():
    rng = np.random.default_rng(1)
    segments = [rng.choice(np.arange(100, 200), 8, replace=False) for _ in range(6)]
    observed = _planted_scores([_prompt(s, seed=i) for i, s in enumerate(segments)])
    shuffled = _planted_scores([_prompt(s, shuffled=True, seed=i) for i, s in enumerate(segments)])
    assert observed[:, 3, 2].mean() == pytest.approx(1.0)
    assert shuffled[:, 3, 2].mean() < 0.25
    null = robustness.shuffled_null(shuffled, "mean", 0.9, 200, 0)
    obs = induction.layer_profile(observed.mean(0))
    assert obs[3] > null["hi"][3]  # the observed peak leaves the null band
    perm = robustness.head_permutation_null(observed.mean(0), "mean", 0.9, 500, 0)
    assert np.allclose(np.mean(perm["mean"]), obs.mean())  # permutation keeps the total
    assert np.ptp(perm["mean"]) < np.ptp(obs) / 2  # ... but spreads the planted layer's out


def _previous_token_head(t_len: int) -> torch.Tensor:
    """Attention of a perfect previous-token head: from t to t - 1 (BOS to itself)."""
    probs = torch.zeros(t_len, t_len)
    probs[0, 0] = 1.0
    probs[torch.arange(1, t_len), torch.arange(t_len - 1)] = 1.0
    return probs


def test_planted_previous_token_head_scores_as_induction_only_at_lag_two():
    rng = np.random.default_rng(2)
    lags = [2, 3, 5, 8] * 3
    prompts = [
        _prompt(rng.choice(np.arange(100, 200), lag, replace=False), seed=i)
        for i, lag in enumerate(lags)
    ]
    ind, prev = [], []
    for p in prompts:
        t_len = len(p.tokens)
        uniform = torch.tril(torch.ones(t_len, t_len))
        probs = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 3, t_len, t_len).clone()
        probs[0, 0] = _previous_token_head(t_len)  # head 0: previous token
        probs[0, 1] = _ideal_head(p.tokens)  # head 1: induction
        s = induction.prompt_scores(probs, [p])[0].numpy()  # (2, H)
        ind.append(s[0][None])  # (1 layer, H)
        prev.append(s[1][None])
    ind, prev = np.stack(ind), np.stack(prev)  # (prompts, 1, 3)
    lag = np.asarray([p.lag for p in prompts])
    assert np.allclose(prev[:, 0, 0], 1.0)  # the previous-token head, at every lag
    assert np.allclose(ind[lag == 2, 0, 0], 1.0)  # ... is a perfect "induction head" at lag 2
    assert np.allclose(ind[lag >= 3, 0, 0], 0.0)  # ... and scores nothing from lag 3 on
    assert np.allclose(ind[:, 0, 1], 1.0)  # the induction head at every lag
    assert np.allclose(prev[lag >= 3, 0, 1], 0.0)  # ... with no previous-token score
    confound = induction.lag_confound(ind, prev, lag, top=1)
    assert confound[2]["top_shared"] == 1  # at lag 2 the top heads coincide
    assert all(confound[k]["top_shared"] == 0 for k in (3, 5, 8))
    assert confound[3]["r"] < 0 < confound[2]["r"]


def test_real_models_have_induction_heads_that_the_null_lacks(smollm2):
    model, tok, _ = smollm2
    prompts = induction.make_prompts(tok, ["random", "names"], [4, 8], 48, 2, 0)
    assert {p.family for p in prompts} == {"random", "names"}
    scored = list(induction.score_prompts(model, prompts, batch_size=6))
    obs = np.stack([s for p, s, _ in scored if not p.shuffled]).mean(0)
    null = np.stack([s for p, s, _ in scored if p.shuffled]).mean(0)
    prev = np.stack([s for p, _, s in scored if not p.shuffled]).mean(0)
    assert prev.max() > 0.5  # a previous-token head, scored apart from induction
    assert obs.max() > 0.2 and obs.max() > 3 * null.max()


def test_ablating_no_head_changes_nothing_and_one_head_changes_the_output(smollm2):
    model, _, info = smollm2
    ids = torch.as_tensor(np.random.default_rng(0).integers(300, 5000, size=(1, 24)))
    seen = {}
    o_proj = model.model.layers[3].self_attn.o_proj
    # A forward hook sees the input the projection actually ran on, after the ablation.
    hook = o_proj.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with causal.ablate_heads(model, []):
            same = model(input_ids=ids).logits
        with causal.ablate_heads(model, [(3, 1)]):
            ablated = model(input_ids=ids).logits
        zeroed = seen["x"].clone()
        with causal.ablate_heads(model, [(3, 1)], "mean"):
            model(input_ids=ids)
        meaned = seen["x"].clone()
    hook.remove()
    d = info.head_dim
    assert torch.equal(plain, same)
    assert (plain - ablated).abs().max() > 1e-3
    assert (zeroed[..., d : 2 * d] == 0).all() and (zeroed[..., :d] != 0).any()
    torch.testing.assert_close(meaned[..., d : 2 * d], meaned[:, :1, d : 2 * d].expand(1, 24, d))
