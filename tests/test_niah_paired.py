"""Paired NIAH comparisons on a synthetic NIAH table with known answers."""

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from attnlab import niah_paired
from attnlab.errors import UserError
from attnlab.stats import bootstrap_ci

N = 20  # prompts: 4 lengths x 5 depths, one sample


def _table(correct: dict[tuple[str, str, float], list[int]], seed=0) -> pl.DataFrame:
    """A NIAH table as the pipeline writes it: one row per (regime, policy, sparsity,
    prompt); rows shuffled, so pairing must go by prompt identity, not row order."""
    lengths, depths = np.meshgrid([512, 1024, 2048, 4096], [0.0, 0.25, 0.5, 0.75, 1.0])
    rows = [
        {
            "model": "m",
            "regime": regime,
            "task": "passkey",
            "policy": policy,
            "target_sparsity": sparsity,
            "length": int(lengths.ravel()[i]),
            "depth": float(depths.ravel()[i]),
            "sample": 0,
            "haystack": "noise",
            "correct": bool(c),
            "feasible": True,
        }
        for (regime, policy, sparsity), values in correct.items()
        for i, c in enumerate(values)
    ]
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=seed)


def test_paired_difference_has_the_binomial_interval_and_beats_overlapping_marginals():
    """A right on prompts 0-11, B on 0-5 (a subset): B - A is -1 on 6 prompts of 20 and 0
    elsewhere, so its bootstrap is -Binomial(20, 0.3) / 20, an interval that excludes 0,
    while A's and B's own intervals overlap."""
    a = [1] * 12 + [0] * 8
    b = [1] * 6 + [0] * 14
    df = _table(
        {
            ("cache", "full", 0.0): [1] * N,
            ("prefill", "full", 0.0): [1] * 10 + [0] * 10,  # the other regime's full
            ("cache", "a", 0.99): a,
            ("cache", "b", 0.99): b,
            ("cache", "topk", 0.99): [1] * N,  # the oracle: never the "best other"
        }
    )
    rows = {r["policy"]: r for r in niah_paired.paired_rows(df, resamples=4000, seed=0)}
    ra, rb = rows["a"], rows["b"]
    assert rb["best_other"] == "a" and ra["best_other"] == "b"
    assert rows["topk"]["best_other"] == "a"
    assert rb["diff_best"] == pytest.approx(-0.3)
    lo, hi = sps.binom.ppf([0.975, 0.025], N, 0.3) / N
    assert rb["diff_best_lo"] == pytest.approx(-lo, abs=0.051)
    assert rb["diff_best_hi"] == pytest.approx(-hi, abs=0.051)
    assert rb["best_excludes_zero"] and ra["best_excludes_zero"]
    assert ra["diff_best_lo"] == pytest.approx(-rb["diff_best_hi"])  # the same draws
    # The marginal intervals, each over the prompts on its own, overlap.
    assert bootstrap_ci(np.array(b, float))[1] > bootstrap_ci(np.array(a, float))[0]
    # Paired with the cache regime's full attention (all right), not the prefill one's.
    assert ra["full_accuracy"] == 1.0 and ra["diff_full"] == pytest.approx(-0.4)
    assert ra["full_excludes_zero"] and ra["resampled"] == "prompt" and ra["prompts"] == N
    assert not rows["topk"]["full_excludes_zero"]  # equal on every prompt: (0, 0)


def test_policies_that_differ_on_one_prompt_are_not_told_apart():
    df = _table(
        {
            ("cache", "full", 0.0): [1] * N,
            ("cache", "a", 0.9): [1] * 10 + [0] * 10,
            ("cache", "b", 0.9): [1] * 9 + [0] * 11,
        }
    )
    rows = {r["policy"]: r for r in niah_paired.paired_rows(df, resamples=2000)}
    assert rows["a"]["diff_best"] == pytest.approx(0.05)
    assert rows["a"]["diff_best_lo"] == 0.0 and not rows["a"]["best_excludes_zero"]


def test_a_prompt_full_attention_lacks_is_an_error():
    df = _table({("cache", "full", 0.0): [1] * N, ("cache", "a", 0.9): [1] * N})
    with pytest.raises(UserError, match="same prompts"):
        niah_paired.paired_rows(df.filter(~((pl.col("policy") == "full") & (pl.col("depth") == 0))))


def test_a_policy_run_on_part_of_the_prompts_is_paired_on_those_alone():
    """A variant run at one length only: compared with full attention on its 5 prompts,
    while the other policies keep all 20 and their own best-other comparison."""
    a, b, c = [1] * 10 + [0] * 10, [0] * 10 + [1] * 10, [1, 0, 1, 0, 1] * 4
    df = _table({("cache", "full", 0.0): [1] * N, ("cache", "a", 0.9): a})
    df = pl.concat([df, _table({("cache", "b", 0.9): b, ("cache", "c", 0.9): c})])
    df = df.filter((pl.col("policy") != "c") | (pl.col("length") == 4096))
    rows = {r["policy"]: r for r in niah_paired.paired_rows(df, resamples=200)}
    assert rows["a"]["prompts"] == rows["b"]["prompts"] == N and rows["c"]["prompts"] == 5
    assert rows["a"]["best_other"] == "b" and rows["c"]["best_other"] is None
    c_at_4096 = [c[i] for i in range(N) if i % 4 == 3]  # lengths cycle fastest
    assert rows["c"]["accuracy"] == pytest.approx(np.mean(c_at_4096))
    assert rows["c"]["diff_full"] == pytest.approx(np.mean(c_at_4096) - 1.0)


def test_separation_auc_is_the_chance_a_correct_answer_scores_higher():
    from attnlab.stats import separation_auc

    assert separation_auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert separation_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    # pairs (correct, wrong): (0.5, 0.5) a tie, (0.5, 0.2) and (0.9, .) above: 3.5 of 4
    assert separation_auc([0.5, 0.9, 0.5, 0.2], [True, True, False, False]) == 0.875
    assert np.isnan(separation_auc([0.3, 0.4], [True, True]))  # one class: undefined


def test_a_threshold_only_run_is_drawn_once_at_its_achieved_sparsity(tmp_path):
    """XAttention without a budget cap gives one run whatever the target: the summary
    panels draw it once, at the sparsity it achieved."""
    import matplotlib.pyplot as plt

    from attnlab.plots.niah import _accuracy_panel

    rows = [
        dict(
            policy=p,
            target_sparsity=s,
            achieved_sparsity=a,
            correct=c,
            feasible=True,
            policy_params=json.dumps({"threshold_only": p == "xattention_free"}),
        )
        for p, a in (("full", 0.0), ("topk", None), ("xattention_free", 0.7))
        for s in ((0.0,) if p == "full" else (0.9, 0.95))
        for c in (True, False)
    ]
    d = pl.DataFrame(rows).with_columns(
        achieved_sparsity=pl.col("achieved_sparsity").fill_null(pl.col("target_sparsity"))
    )
    fig, ax = plt.subplots()
    _accuracy_panel(ax, d, 0)
    lines = {c.get_label(): c for c in ax.containers}
    free = next(v for k, v in lines.items() if k.startswith("xattention_free"))
    assert free.lines[0].get_xdata().tolist() == [0.7] and "70.0% achieved" in free.get_label()
    assert lines["topk"].lines[0].get_xdata().tolist() == [0.9, 0.95]
    plt.close(fig)
