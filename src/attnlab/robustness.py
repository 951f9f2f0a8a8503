"""Nulls and bootstrap intervals for induction-head layer profiles.

All take per-prompt head scores (prompts, layers, heads). Intervals are 95% percentile
intervals of a bootstrap over prompts: multinomial resampling counts
(:func:`attnlab.stats.resample_counts`) weight whole score matrices; seeded.
"""

from __future__ import annotations

import numpy as np

from attnlab.induction import layer_profile, peak_and_bandwidth
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
