"""Gain analysis of a query-scaling sweep.

Gain of a metric = least-squares slope of its mean over tokens against log(scale). Its
95% interval, and that of the target/control gain ratio, come from a bootstrap over
tokens: the same (sample, token) units are resampled for every scale and for both heads,
since both sweeps ran on the same chunks. Monotonicity: Spearman's rho between scale and
the metric over every (scale, token) pair, with its p-value; the verdict says plainly
whether the expected direction was found, the opposite, or no trend.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats as sps

from attnlab.intervention import EXPECTED, SWEEP_METRICS
from attnlab.stats import percentile_interval, resample_counts


def unit_matrices(
    target: pl.DataFrame, control: pl.DataFrame, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scales, T, C): T and C are (units, scales), one row per (sample, token) that both
    sweeps measured, with the metric at every scale; units with a NaN anywhere (entropy
    of tokens 0 and 1) are dropped from both."""
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
    return np.array([float(s) for s in order]), t[ok], c[ok]


def slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y (..., S) against x (S,)."""
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc * xc).sum()


def verdict(metric: str, rho: float, p: float, alpha: float = 0.05) -> str:
    """Plain words: the direction found (if any), and whether it is the expected one."""
    p_text = "p < 1e-300" if p == 0 else f"p = {p:.2g}"
    if not np.isfinite(p) or p >= alpha:
        return f"no monotone trend (rho = {rho:.3f}, {p_text})"
    found = "increasing" if rho > 0 else "decreasing"
    agrees = (
        "as expected"
        if found == EXPECTED[metric]
        else f"opposite to the expected {EXPECTED[metric]}"
    )
    return f"{found}, {agrees} (rho = {rho:.3f}, {p_text})"


def gain_rows(
    target: pl.DataFrame, control: pl.DataFrame, resamples: int = 2000, seed: int = 0
) -> list[dict]:
    """One row per (metric, role): gain with its interval, Spearman rho, p, verdict, and
    the target/control ratio with its interval (on both rows of a metric)."""
    rng = np.random.default_rng(seed)
    rows = []
    for metric in SWEEP_METRICS:
        scales, t_mat, c_mat = unit_matrices(target, control, metric)
        n_units = len(t_mat)
        weights = resample_counts(rng, n_units, resamples)
        x = np.log(scales)
        gains, boots = {}, {}
        for role, df, m in (("target", target, t_mat), ("control", control, c_mat)):
            means = m.mean(0)
            gains[role] = float(slope(x, means))
            boots[role] = slope(x, weights @ m / n_units)  # (R,)
            rho, p = sps.spearmanr(np.repeat(x[None], len(m), 0).ravel(), m.ravel())
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
                    "spearman_rho": float(rho),
                    "spearman_p": float(p),
                    "means_monotone": bool(
                        np.all(np.diff(means) > 0) or np.all(np.diff(means) < 0)
                    ),
                    "verdict": verdict(metric, float(rho), float(p)),
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
