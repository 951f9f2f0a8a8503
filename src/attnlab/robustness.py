"""Nulls and bootstrap intervals for induction-head layer profiles.

All take per-prompt head scores (prompts, layers, heads). Intervals are percentile
intervals of a bootstrap over prompts (multinomial resampling weights, the resampler of
:func:`attnlab.stats.bootstrap_ci` applied to whole score matrices), seeded.
"""

from __future__ import annotations

import numpy as np

from attnlab.induction import layer_profile, peak_and_bandwidth


def _weights(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n  # (R, n)


def _interval(x: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple:
    a = (1 - level) / 2
    lo, hi = np.quantile(x, [a, 1 - a], axis=axis)
    return lo, hi


def bootstrap_profile(
    scores: np.ndarray, how: str, quantile: float, resamples: int, seed: int
) -> dict:
    """Profile, peak relative depth and bandwidth with 95% intervals over prompts."""
    profile = layer_profile(scores.mean(0), how, quantile)
    peak, width = peak_and_bandwidth(profile)
    boot_scores = np.einsum("rp,plh->rlh", _weights(len(scores), resamples, seed), scores)
    boot = layer_profile(boot_scores, how, quantile)  # (R, L)
    stats = np.array([peak_and_bandwidth(b) for b in boot])  # (R, 2)
    (p_lo, w_lo), (p_hi, w_hi) = _interval(stats)
    lo, hi = _interval(boot)
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
    boot_scores = np.einsum("rp,plh->rlh", _weights(len(null_scores), resamples, seed), null_scores)
    lo, hi = _interval(layer_profile(boot_scores, how, quantile))
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
    lo, hi = _interval(profiles)
    return {"mean": profiles.mean(0).tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
