"""Gain analysis of a query-scaling sweep.

Gain of a metric = least-squares slope of its mean over tokens against log(scale). The
independent unit is the corpus chunk (tokens of one chunk share their context and are
correlated), so the 95% intervals of the gain and of the target/control gain ratio come
from a bootstrap over chunks: the same chunks are resampled for every scale and for both
heads, since both sweeps ran on the same chunks. The verdict comes from the chunk-level
slopes (each chunk's mean metric against log(scale)): a one-sample t-test of their mean
against zero, so that the p-value counts chunks, not (scale, token) pairs; it says
plainly whether the expected direction was found, the opposite, or no trend.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats as sps

from attnlab.intervention import EXPECTED, SWEEP_METRICS
from attnlab.jobs import Gain
from attnlab.stats import cluster_bootstrap, cluster_sums, percentile_interval


def unit_matrices(
    target: pl.DataFrame, control: pl.DataFrame, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scales, T, C, chunk): T and C are (units, scales), one row per (sample, token)
    that both sweeps measured, with the metric at every scale; chunk (units,) is each
    unit's sample (corpus chunk). Units with a NaN anywhere (entropy of tokens 0 and 1)
    are dropped from both."""
    wide = []
    for df in (target, control):
        w = df.pivot(on="scale", index=["sample", "token"], values=metric, sort_columns=True)
        wide.append(w)
    scale_cols = [c for c in wide[0].columns if c not in ("sample", "token")]
    if scale_cols != [c for c in wide[1].columns if c not in ("sample", "token")]:
        raise ValueError("the target and control sweeps used different scales")
    order = sorted(scale_cols, key=float)
    both = wide[0].join(wide[1], on=["sample", "token"], suffix="_c").sort(["sample", "token"])
    t = both.select(order).to_numpy().astype(np.float64)
    c = both.select([f"{s}_c" for s in order]).to_numpy().astype(np.float64)
    ok = ~(np.isnan(t).any(1) | np.isnan(c).any(1))
    chunk = both["sample"].to_numpy()[ok]
    return np.array([float(s) for s in order]), t[ok], c[ok], chunk


def slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y (..., S) against x (S,)."""
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc * xc).sum()


def chunk_test(slopes: np.ndarray) -> tuple[float, float]:
    """One-sample t-test of chunk-level slopes (C,) against zero: (t, two-sided p); NaN
    where it is undefined (one chunk, or every slope equal)."""
    if len(slopes) < 2 or np.ptp(slopes) == 0:
        return float("nan"), float("nan")
    res = sps.ttest_1samp(slopes, 0.0)
    return float(res.statistic), float(res.pvalue)


def verdict(metric: str, slopes: np.ndarray, p: float, alpha: float = 0.05) -> str:
    """Plain words from the chunk-level slopes (C,): the direction found (if any), and
    whether it is the expected one, with how many chunks share it and the t-test's p."""
    mean = float(np.mean(slopes))
    agree = int(np.sum(np.sign(slopes) == np.sign(mean))) if mean != 0 else 0
    detail = f"{agree} of {len(slopes)} chunks, p = {p:.2g}"
    if not np.isfinite(p) or p >= alpha:
        return f"no monotone trend ({detail})"
    found = "increasing" if mean > 0 else "decreasing"
    agrees = (
        "as expected"
        if found == EXPECTED[metric]
        else f"opposite to the expected {EXPECTED[metric]}"
    )
    return f"{found}, {agrees} ({detail})"


def gain_rows(
    target: pl.DataFrame, control: pl.DataFrame, resamples: int = 2000, seed: int = 0
) -> list[dict]:
    """One row per (metric, role): gain with its chunk-bootstrap interval, the chunk-level
    t-test and verdict, and the target/control ratio with its interval (on both rows of a
    metric)."""
    rows = []
    for metric in SWEEP_METRICS:
        scales, t_mat, c_mat, chunk = unit_matrices(target, control, metric)
        x = np.log(scales)
        # Per chunk: the metric summed over its tokens at each scale, both heads, and its
        # token count: (C, 2S + 1); resampled jointly.
        units = np.concatenate([t_mat, c_mat, np.ones((len(chunk), 1))], axis=1)
        sums, _ = cluster_sums(units, chunk)
        n_scales = len(scales)
        boot = cluster_bootstrap(sums, resamples, seed)  # (R, 2S + 1)
        gains, boots = {}, {}
        for i, (role, df, m) in enumerate((("target", target, t_mat), ("control", control, c_mat))):
            cols = slice(i * n_scales, (i + 1) * n_scales)
            means = m.mean(0)
            gains[role] = float(slope(x, means))
            boots[role] = slope(x, boot[:, cols] / boot[:, -1:])  # (R,)
            chunk_slopes = slope(x, sums[:, cols] / sums[:, -1:])  # (C,)
            t_stat, p = chunk_test(chunk_slopes)
            lo, hi = percentile_interval(boots[role])
            rows.append(
                {
                    "metric": metric,
                    "role": role,
                    "layer": int(df["layer"][0]),
                    "head": int(df["head"][0]),
                    "gain": gains[role],
                    "gain_lo": float(lo),
                    "gain_hi": float(hi),
                    "resampled": "chunk",
                    "chunk_t": t_stat,
                    "chunk_p": p,
                    "means_monotone": bool(
                        np.all(np.diff(means) > 0) or np.all(np.diff(means) < 0)
                    ),
                    "verdict": verdict(metric, chunk_slopes, p),
                    "chunks": int(len(sums)),
                    "units": int(len(m)),
                    "scales": scales.tolist(),
                }
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_boot = boots["target"] / boots["control"]
        ratio = gains["target"] / gains["control"] if gains["control"] != 0 else float("nan")
        ratio_boot = ratio_boot[np.isfinite(ratio_boot)]  # a control gain of exactly 0
        r_lo, r_hi = percentile_interval(ratio_boot) if ratio_boot.size else (np.nan, np.nan)
        for r in rows[-2:]:
            r.update(ratio=float(ratio), ratio_lo=float(r_lo), ratio_hi=float(r_hi))
    return rows


def write_gain(job: Gain) -> None:
    """The gain rows (:func:`gain_rows`) of the target's and the control's sweep tables,
    each also printed to stderr, written to ``job.out``."""
    import sys

    from attnlab import tables

    cols = ["scale", "sample", "token", "layer", "head", *SWEEP_METRICS]
    rows = gain_rows(
        tables.read(job.target, cols), tables.read(job.control, cols), job.resamples, job.seed
    )
    meta = {
        "target": tables.meta(job.target),
        "control": tables.meta(job.control),
        "resamples": job.resamples,
        "seed": job.seed,
    }
    for r in rows:
        r["model"] = meta["target"].get("model")
        print(
            f"{r['metric']:<11} {r['role']:<8} gain {r['gain']:+.4f} "
            f"[{r['gain_lo']:+.4f}, {r['gain_hi']:+.4f}]  {r['verdict']}",
            file=sys.stderr,
        )
    tables.write(rows, job.out, meta=meta)
