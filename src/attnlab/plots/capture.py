"""Capture figures, drawn from the per-token metrics table (a folder of Parquet files)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from attnlab import tables
from attnlab.plots import needs, save_figure
from attnlab.stats import head_pearson


def _title(meta: dict, df: pl.DataFrame, what: str) -> str:
    n = df["sample"].n_unique()
    return f"{meta.get('model', '?')}: {what} ({n} chunks of {meta.get('chunk_len', '?')} tokens)"


def _layer_head_grid(df: pl.DataFrame, value: str) -> np.ndarray:
    """Mean of ``value`` per (layer, head), NaNs ignored: (layers, heads)."""
    agg = df.group_by("layer", "head").agg(pl.col(value).fill_nan(None).mean())
    grid = np.full((df["layer"].max() + 1, df["head"].max() + 1), np.nan)
    grid[agg["layer"].to_numpy(), agg["head"].to_numpy()] = agg[value].to_numpy()
    return grid


def _heatmap(metrics, out, value: str, label: str, cmap: str, vmin=None, vmax=None) -> None:
    df, meta = tables.read_folder(metrics, ["sample", "layer", "head", value])
    grid = _layer_head_grid(df, value)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * grid.shape[1], 1.2 + 0.2 * grid.shape[0]))
    im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(_title(meta, df, label), fontsize=9)
    save_figure(fig, out)


def plot_entropy(metrics, out, **_) -> None:
    """Mean attention entropy (nats) per layer and head; the first two tokens excluded."""
    _heatmap(metrics, out, "entropy", "mean attention entropy (nats)", "magma")


def plot_sink(metrics, out, **_) -> None:
    """Mean attention weight on the first token per layer and head."""
    _heatmap(metrics, out, "sink_mass", "mean sink mass (weight on token 0)", "viridis", 0, 1)


def plot_keff(metrics, out, **_) -> None:
    """Distribution of k_eff per layer over every head and token: box = quartiles,
    whiskers = 5th and 95th percentiles, line = median."""
    df, meta = tables.read_folder(metrics, ["sample", "layer", "k_eff"])
    q = (
        df.group_by("layer")
        .agg(
            [pl.col("k_eff").quantile(p, "linear").alias(f"q{p}") for p in (0.05, 0.25, 0.5)]
            + [pl.col("k_eff").quantile(p, "linear").alias(f"q{p}") for p in (0.75, 0.95)]
            + [pl.col("k_eff").mean().alias("mean")]
        )
        .sort("layer")
    )
    boxes = [
        {
            "label": str(r["layer"]),
            "whislo": r["q0.05"],
            "q1": r["q0.25"],
            "med": r["q0.5"],
            "q3": r["q0.75"],
            "whishi": r["q0.95"],
            "mean": r["mean"],
            "fliers": [],
        }
        for r in q.iter_rows(named=True)
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(boxes) + 1.5), 3.6))
    ax.bxp(boxes, showmeans=True, meanprops={"marker": ".", "markersize": 4})
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    mass = meta.get("mass", 0.9)
    ax.set_ylabel(f"k_eff (keys holding {mass:.0%} of the weight)")
    ax.tick_params(axis="x", labelsize=7)
    what = "effective span per layer; box: quartiles, whiskers: 5th-95th percentile, dot: mean"
    ax.set_title(_title(meta, df, what), fontsize=9)
    save_figure(fig, out)


def plot_qnorm_entropy(metrics, out, resamples: int = 2000, seed: int = 0) -> None:
    """Per-head Pearson correlation of query norm with attention entropy, with a 95%
    interval from a bootstrap over chunks. Left: r per layer and head (a dot where the
    interval excludes 0); right: r per layer, a point and interval per head."""
    df, meta = tables.read_folder(metrics, ["sample", "layer", "head", "q_norm", "entropy"])
    res = head_pearson(df, "q_norm", "entropy", resamples, seed)
    r, lo, hi = res["r"], res["lo"], res["hi"]
    n_layers, n_heads = r.shape
    fig, (ax0, ax1) = plt.subplots(
        1,
        2,
        figsize=(13, 1.8 + 0.18 * n_layers),
        gridspec_kw={"width_ratios": [1, 2]},
        layout="constrained",
    )
    im = ax0.imshow(r, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    sig = (lo > 0) | (hi < 0)
    ys, xs = np.nonzero(sig)
    ax0.scatter(xs, ys, s=4, c="k", label="95% CI excludes 0")
    ax0.set_xlabel("head")
    ax0.set_ylabel("layer")
    ax0.set_xticks(range(n_heads))
    ax0.set_title("dot: 95% CI excludes 0", fontsize=8)
    fig.colorbar(im, ax=ax0, label="Pearson r (query norm, entropy)")
    layers = np.arange(n_layers)
    for h in range(n_heads):
        x = layers + (h - (n_heads - 1) / 2) * 0.7 / n_heads
        ax1.errorbar(
            x,
            r[:, h],
            yerr=[r[:, h] - lo[:, h], hi[:, h] - r[:, h]],
            fmt="o",
            ms=2.5,
            elinewidth=0.8,
            label=f"head {h}",
        )
    ax1.axhline(0, color="0.5", lw=0.8)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("r with 95% bootstrap CI")
    ax1.legend(fontsize=6, ncol=min(n_heads, 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.suptitle(
        _title(meta, df, "query norm vs attention entropy per head")
        + f"; CI: {resamples} resamples of chunks",
        fontsize=9,
    )
    save_figure(fig, out)


FIGURES = {
    "capture-entropy": plot_entropy,
    "capture-qnorm_entropy": plot_qnorm_entropy,
    "capture-keff": plot_keff,
    "capture-sink": plot_sink,
}


def render(
    figure: str, table: list[str], out: str, sparsity=None, resamples=None, seed=None
) -> None:
    """Draw the capture figure ``figure`` from the metrics folder ``table[0]`` to ``out``."""
    FIGURES[figure](table[0], out, **needs(figure, resamples=resamples, seed=seed))
