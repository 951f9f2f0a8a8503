"""Query-scaling figures: the sweep (metrics against scale) and the gains."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from attnlab import tables
from attnlab.plots import needs, save_figure
from attnlab.stats import bootstrap_ci

LABELS = {"entropy": "entropy (nats)", "max_weight": "max attention weight", "k_eff": "k_eff"}
COLORS = {"target": "tab:red", "control": "tab:gray"}


def plot_sweep(sweeps: list[str | Path], out: str | Path, seed: int = 0) -> None:
    """Entropy, max attention and k_eff of the scaled head against the scale (log axis):
    mean over tokens with a 95% bootstrap interval, target and control."""
    expected = tables.meta(sweeps[0])["expected"]  # each metric's expected direction
    metrics = list(expected)
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.6), layout="constrained")
    model = "?"
    for path in sweeps:
        df = tables.read(path, ["scale", "role", "layer", "head", *metrics])
        meta = tables.meta(path)
        model = meta.get("model", model)
        role = df["role"][0]
        label = f"{role} L{df['layer'][0]}H{df['head'][0]}"
        for ax, metric in zip(axes, metrics, strict=True):
            pts = df.group_by("scale").agg(pl.col(metric).fill_nan(None).drop_nulls()).sort("scale")
            xs, ys, err = [], [], [[], []]
            for row in pts.iter_rows(named=True):
                v = np.asarray(row[metric], dtype=float)
                lo, hi = bootstrap_ci(v, n_resamples=1000, seed=seed)
                xs.append(row["scale"])
                ys.append(v.mean())
                err[0].append(v.mean() - lo)
                err[1].append(hi - v.mean())
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=COLORS[role], label=label)
    for ax, metric in zip(axes, metrics, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("query scale")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(f"{metric}: expected {expected[metric]}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: query-scaling sweep (mean over tokens, 95% bootstrap CI)", fontsize=10)
    save_figure(fig, out)


def plot_gain(table: str | Path, out: str | Path) -> None:
    """Gain (slope against log scale) per metric for target and control, with 95% intervals,
    the target/control ratio and the monotonicity verdict."""
    cols = ["metric", "role", "gain", "gain_lo", "gain_hi", "ratio", "ratio_lo", "ratio_hi"]
    df = tables.read(table, [*cols, "verdict", "resampled", "chunks"])
    metrics = df["metric"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.8), layout="constrained")
    for ax, metric in zip(axes, metrics, strict=True):
        d = df.filter(pl.col("metric") == metric)
        roles = d["role"].to_list()
        g = d["gain"].to_numpy()
        err = [g - d["gain_lo"].to_numpy(), d["gain_hi"].to_numpy() - g]
        ax.bar(roles, g, yerr=err, capsize=4, color=[COLORS[r] for r in roles])
        ax.axhline(0, color="0.4", lw=0.8)
        first = d.row(0, named=True)
        ax.set_title(
            f"{metric}: target/control = {first['ratio']:.2f} "
            f"[{first['ratio_lo']:.2f}, {first['ratio_hi']:.2f}]",
            fontsize=9,
        )
        ax.set_xlabel(
            "\n".join(f"{r['role']}: {r['verdict']}" for r in d.iter_rows(named=True)),
            fontsize=6.5,
        )
        ax.set_ylabel(f"gain: d {metric} / d log(scale)")
    model = tables.meta(table).get("target", {}).get("model", "?")
    first = df.row(0, named=True)
    fig.suptitle(
        f"{model}: gain of the query scale, 95% bootstrap intervals resampling "
        f"{first['resampled']}s ({first['chunks']}); verdicts from chunk-level slopes",
        fontsize=10,
    )
    save_figure(fig, out)


def render(
    figure: str, table: list[str], out: str, sparsity=None, resamples=None, seed=None
) -> None:
    """Draw ``intervention`` from the target's and the control's sweep tables, or ``gain``
    from the gain table, to ``out``."""
    if figure == "gain":
        plot_gain(table[0], out)
    else:
        plot_sweep(table, out, **needs(figure, seed=seed))
