"""Small statistics shared by every stage."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values, n_resamples: int = 2000, level: float = 0.95, seed: int = 0, stat=np.mean
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (1-D), deterministic in seed.

    A sample of one value, or of identical values, gives the degenerate interval (v, v).
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    boot = stat(x[idx], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))
