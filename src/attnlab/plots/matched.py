"""Figure: accuracy against speedup at each policy's sparsities (the accuracy-matched
points), from the matched points table alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from attnlab.plots import save_figure
from attnlab.plots.styles import ordered, policy_styles

# one panel per measured speed: (regime, column, title)
PANELS = (
    ("cache", "attention_speedup", "cache regime: one decode step's attention"),
    ("cache", "end_to_end_speedup", "cache regime: the real model's decode step"),
    ("prefill", "attention_speedup", "prefill regime: selection and attention"),
    ("prefill", "end_to_end_speedup", "prefill regime: the whole prefill"),
)
MARKERS = {0.9: "o", 0.95: "s", 0.99: "^"}  # target sparsity; others: "D"


def plot_matched(pts: pl.DataFrame, meta: dict, out: str | Path) -> None:
    """A panel per regime and speed (the attention's alone, end to end): each (policy,
    sparsity) with that speed measured, its share of full attention's correct answers
    against the speedup (log scale), the sparsity by its marker, the matched share marked
    by a line."""
    regimes = set(pts["regime"].to_list())
    panels = [p for p in PANELS if p[0] in regimes]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.4), squeeze=False)
    styles = policy_styles(pts["policy"].unique())
    for ax, (regime, column, title) in zip(axes[0], panels, strict=True):
        d = pts.filter((pl.col("regime") == regime) & pl.col(column).is_not_nan())
        for policy in ordered(d["policy"].unique()):
            p = d.filter(pl.col("policy") == policy).sort("target_sparsity")
            style = {k: v for k, v in styles[policy].items() if k != "zorder"}
            ax.plot(p[column], p["share"], label=policy, **style)
            for r in p.iter_rows(named=True):
                marker = MARKERS.get(round(r["target_sparsity"], 4), "D")
                ax.plot(r[column], r["share"], marker=marker, color=style["color"], ms=6)
        ax.axhline(meta["share"], color="0.5", linestyle="--", linewidth=0.8)
        ax.axvline(1.0, color="0.8", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlabel("speedup against full attention (x)")
        ax.set_ylabel("share of full attention's passkeys")
        ax.set_title(title, fontsize=9)
        if d.height:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no speed measured for\nthe selections scored", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")  # fmt: skip
    shapes = [
        Line2D([], [], marker=m, color="0.3", linestyle="", label=f"{s:.0%}")
        for s, m in MARKERS.items()
    ]
    fig.legend(handles=shapes, title="target sparsity", loc="upper right", fontsize=7,
               title_fontsize=7, ncols=3)  # fmt: skip
    fig.suptitle(
        f"Accuracy against speedup at {meta['length']} tokens ({meta['shape']}; dashed:"
        f" {meta['share']:.0%} of full attention's passkeys)",
        fontsize=10,
        x=0.4,
    )
    save_figure(fig, out)
