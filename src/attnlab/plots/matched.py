"""Figure: accuracy against speedup at each policy's sparsities (the accuracy-matched
points), from the matched points table alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
from matplotlib.ticker import NullFormatter

from attnlab.plots import save_figure
from attnlab.plots.styles import ordered, policy_styles


def plot_matched(pts: pl.DataFrame, meta: dict, out: str | Path) -> None:
    """A panel per regime: each (policy, sparsity) with a measured speedup, its share of
    full attention's correct answers against that speedup (the attention's alone where
    measured, else end to end; log scale), the matched share marked by a line."""
    regimes = pts["regime"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.4 * len(regimes), 4.2), squeeze=False)
    styles = policy_styles(pts["policy"].unique())
    for ax, regime in zip(axes[0], regimes, strict=True):
        d = pts.filter(pl.col("regime") == regime).with_columns(
            speedup=pl.col("attention_speedup").fill_nan(pl.col("end_to_end_speedup"))
        )
        for policy in ordered(d["policy"].unique()):
            p = d.filter((pl.col("policy") == policy) & pl.col("speedup").is_not_nan())
            if p.height:
                ax.plot(p["speedup"], p["share"], marker="o", label=policy, **styles[policy])
                for r in p.iter_rows(named=True):
                    ax.annotate(
                        f"{r['target_sparsity']:.0%}",
                        (r["speedup"], r["share"]),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.axhline(meta["share"], color="0.5", linestyle="--", linewidth=0.8)
        ax.axvline(1.0, color="0.8", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlabel("speedup against full attention (x)")
        ax.set_ylabel("share of full attention's passkeys")
        ax.set_title(f"{regime} regime", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5,
                0.5,
                "no speed measured for\nthe selections scored",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
    fig.suptitle(
        f"Accuracy against speedup at {meta['length']} tokens ({meta['shape']} decode shapes;"
        f" dashed: {meta['share']:.0%} of full attention's passkeys)",
        fontsize=10,
    )
    save_figure(fig, out)
