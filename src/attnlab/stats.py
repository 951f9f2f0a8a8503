"""Small statistics shared by every stage."""

from __future__ import annotations

import numpy as np


def resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """Bootstrap draws as multinomial counts: (resamples, n), each row summing to n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def percentile_interval(boot: np.ndarray, level: float = 0.95, axis: int = 0) -> np.ndarray:
    """Percentile interval of bootstrap values along ``axis`` (NaNs ignored): (2, ...)."""
    alpha = (1.0 - level) / 2.0
    return np.nanquantile(boot, [alpha, 1.0 - alpha], axis=axis)


def cluster_bootstrap(per_cluster, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap totals of per-cluster statistics: per_cluster (C, ...) -> (R, ...).

    Each resample draws C clusters with replacement (multinomial counts) and sums their
    rows. One draw serves every column, so a statistic formed from several columns (a
    ratio of sums, a difference of two policies on the same prompts, two heads on the same
    chunks) is resampled jointly: paired. The cluster is the independent unit (a corpus
    chunk, a prompt); tokens of one chunk are not. Deterministic in ``seed``.
    """
    x = np.asarray(per_cluster, dtype=float)
    counts = resample_counts(np.random.default_rng(seed), len(x), resamples)  # (R, C)
    return np.tensordot(counts.astype(float), x, axes=(1, 0))


def cluster_sums(values, cluster) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``values`` (N, ...) per cluster label (N,), in label order: (C, ...), and
    the labels (C,)."""
    labels, inverse = np.unique(np.asarray(cluster), return_inverse=True)
    x = np.asarray(values, dtype=float)
    sums = np.zeros((len(labels), *x.shape[1:]))
    np.add.at(sums, inverse, x)
    return sums, labels


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


def cluster_pearson(
    x: np.ndarray,
    y: np.ndarray,
    cluster: np.ndarray,
    group: np.ndarray,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Pearson r of x and y within each group, with a percentile bootstrap interval that
    resamples whole clusters (e.g. corpus chunks, whose tokens are not independent).

    x, y: 1-D values; cluster, group: non-negative integer labels of the same length.
    Pairs with a NaN are dropped. Returns arrays indexed by group label: r, lo, hi, n.
    The same cluster draws serve every group, so the intervals are comparable.
    """
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y, cluster, group = x[ok], y[ok], cluster[ok], group[ok]
    n_groups = int(group.max()) + 1 if group.size else 0
    _, cl = np.unique(cluster, return_inverse=True)
    n_cl = int(cl.max()) + 1 if cl.size else 0
    cell = group * n_cl + cl
    size = n_groups * n_cl
    # Sufficient statistics per (group, cluster): n, sums of x, y, xx, yy, xy.
    stats = np.stack(
        [
            np.bincount(cell, weights=w, minlength=size)
            for w in (np.ones_like(x), x, y, x * x, y * y, x * y)
        ],
        axis=-1,
    ).reshape(n_groups, n_cl, 6)

    def pearson(s: np.ndarray) -> np.ndarray:  # s: (..., 6) summed stats
        n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sxy - sx * sy / n
            return cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))

    r = pearson(stats.sum(1))
    counts = resample_counts(np.random.default_rng(seed), n_cl, n_resamples)  # (R, C)
    boot = pearson(np.einsum("rc,gcs->rgs", counts.astype(float), stats))  # (R, G)
    lo, hi = percentile_interval(boot, level)
    return {"r": r, "lo": lo, "hi": hi, "n": stats[..., 0].sum(1)}


def head_pearson(df, x: str, y: str, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per (layer, head) Pearson r of columns ``x`` and ``y`` of a capture table (with
    ``sample``, ``layer`` and ``head`` columns), with intervals from a bootstrap over
    samples (:func:`cluster_pearson`). Returns r, lo, hi, n as (layers, heads) arrays."""
    n_heads = int(df["head"].max()) + 1
    group = df["layer"].to_numpy().astype(np.int64) * n_heads + df["head"].to_numpy()
    res = cluster_pearson(
        df[x].to_numpy().astype(np.float64),
        df[y].to_numpy().astype(np.float64),
        df["sample"].to_numpy(),
        group,
        n_resamples=n_resamples,
        seed=seed,
    )
    return {k: v.reshape(-1, n_heads) for k, v in res.items()}


def separation_auc(scores, labels) -> float:
    """How well ``scores`` separate True from False ``labels``: the probability that a
    random True item scores above a random False one, ties counting half (the area under
    the ROC curve; 0.5: no separation). NaN where either class is empty or a score is."""
    x, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    if np.isnan(x).any() or y.all() or not y.any():
        return float("nan")
    pos, neg = x[y][:, None], x[~y][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())
