"""Nulls and bootstrap intervals for induction-head layer profiles.

All take per-prompt head scores (prompts, layers, heads). Intervals are 95% percentile
intervals of a bootstrap over prompts: multinomial resampling counts
(:func:`attnlab.stats.resample_counts`) weight whole score matrices; seeded.
"""

from __future__ import annotations

import numpy as np

from attnlab.induction import SHORT_LAG, lag_confound, layer_profile, peak_and_bandwidth
from attnlab.jobs import InductionAnalysis
from attnlab.stats import percentile_interval, resample_counts


def _boot_profiles(scores: np.ndarray, how: str, quantile: float, resamples: int, seed: int):
    """Layer profiles of ``resamples`` bootstrap means over prompts: (R, L)."""
    n = len(scores)
    weights = resample_counts(np.random.default_rng(seed), n, resamples) / n  # (R, n)
    return layer_profile(np.einsum("rp,plh->rlh", weights, scores), how, quantile)


def bootstrap_profile(
    scores: np.ndarray, how: str, quantile: float, resamples: int, seed: int
) -> dict:
    """Profile, peak relative depth and bandwidth with 95% intervals over prompts."""
    profile = layer_profile(scores.mean(0), how, quantile)
    peak, width = peak_and_bandwidth(profile)
    boot = _boot_profiles(scores, how, quantile, resamples, seed)
    stats = np.array([peak_and_bandwidth(b) for b in boot])  # (R, 2)
    (p_lo, w_lo), (p_hi, w_hi) = percentile_interval(stats)
    lo, hi = percentile_interval(boot)
    return {
        "profile": profile.tolist(),
        "profile_lo": lo.tolist(),
        "profile_hi": hi.tolist(),
        "peak_depth": peak,
        "peak_depth_ci": [float(p_lo), float(p_hi)],
        "bandwidth": width,
        "bandwidth_ci": [float(w_lo), float(w_hi)],
        "prompts": int(len(scores)),
    }


def shuffled_null(
    null_scores: np.ndarray, how: str, quantile: float, resamples: int, seed: int
) -> dict:
    """Profile of the shuffled-antecedent prompts with its 95% band over prompts."""
    lo, hi = percentile_interval(_boot_profiles(null_scores, how, quantile, resamples, seed))
    return {
        "profile": layer_profile(null_scores.mean(0), how, quantile).tolist(),
        "lo": lo.tolist(),
        "hi": hi.tolist(),
    }


def head_permutation_null(
    head_scores: np.ndarray, how: str, quantile: float, permutations: int, seed: int
) -> dict:
    """Profiles after shuffling the (layers, heads) scores across every layer and head:
    what the profile looks like when depth carries no information; 95% band and mean."""
    rng = np.random.default_rng(seed)
    flat = head_scores.ravel()
    perms = np.stack([rng.permutation(flat) for _ in range(permutations)])
    profiles = layer_profile(perms.reshape(permutations, *head_scores.shape), how, quantile)
    lo, hi = percentile_interval(profiles)
    return {"mean": profiles.mean(0).tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


def _score_array(df, shuffled: bool, n_layers: int, n_heads: int, column: str = "score"):
    """Per-prompt (prompts, layers, heads) scores of the observed or the shuffled prompts
    in an induction scores table."""
    import polars as pl

    d = df.filter(pl.col("shuffled") == shuffled).sort(["family", "lag", "prompt", "layer", "head"])
    return d[column].to_numpy().reshape(-1, n_layers, n_heads).astype(np.float64)


def _profile(df, meta: dict, how: str, quantile: float, resamples: int, seed: int) -> dict:
    """The layer profile with its intervals (:func:`bootstrap_profile`), the mean head
    scores, the lag confound of the random family, and the short- and long-lag profiles."""
    import polars as pl

    n_layers, n_heads = meta["n_layers"], meta["n_heads"]
    observed = _score_array(df, False, n_layers, n_heads)
    profile = bootstrap_profile(observed, how, quantile, resamples, seed)
    profile |= {
        "model": meta["model"],
        "n_layers": n_layers,
        "how": how,
        "quantile": quantile,
        "relative_depth": [i / n_layers for i in range(n_layers)],
        "head_scores": observed.mean(0).tolist(),
        "prev_head_scores": _score_array(df, False, n_layers, n_heads, "prev_score")
        .mean(0)
        .tolist(),
        "lags": {},
    }
    random = df.filter((pl.col("family") == "random") & ~pl.col("shuffled"))
    if random.height:
        by_prompt = random.sort(["family", "lag", "prompt", "layer", "head"])
        profile["by_lag"] = lag_confound(
            _score_array(random, False, n_layers, n_heads),
            _score_array(random, False, n_layers, n_heads, "prev_score"),
            by_prompt["lag"].to_numpy()[:: n_layers * n_heads],
        )
    short = pl.col("lag") <= SHORT_LAG
    profile["short_lag"] = SHORT_LAG  # the split, for the figure
    for name, cond in (("short", short), ("long", ~short)):
        part = df.filter(cond & (pl.col("family") == "random"))
        if part.height:
            scores = _score_array(part, False, n_layers, n_heads)
            profile["lags"][name] = bootstrap_profile(scores, how, quantile, resamples, seed)
    return profile


def analyse_scores(job: InductionAnalysis) -> None:
    """The layer profile (``job.profile``: ``mean`` or ``top`` of the heads, see
    :func:`attnlab.induction.layer_profile`) of an induction scores table with its
    bootstrap intervals, written to ``job.profile_out``; the shuffled-antecedent and
    head-permutation nulls, to ``job.nulls_out`` (both JSON)."""
    from attnlab import tables

    cols = ["family", "lag", "prompt", "shuffled", "layer", "head", "score", "prev_score"]
    df = tables.read(job.scores, cols)
    meta = tables.meta(job.scores)
    n_layers, n_heads = meta["n_layers"], meta["n_heads"]
    observed = _score_array(df, False, n_layers, n_heads)
    nulls = {
        "model": meta["model"],
        "shuffled_antecedent": shuffled_null(
            _score_array(df, True, n_layers, n_heads),
            job.profile,
            job.quantile,
            job.bootstrap,
            job.seed,
        ),
        "head_permutation": head_permutation_null(
            observed.mean(0), job.profile, job.quantile, job.permutations, job.seed
        ),
    }
    tables.write_json(
        _profile(df, meta, job.profile, job.quantile, job.bootstrap, job.seed), job.profile_out
    )
    tables.write_json(nulls, job.nulls_out)
