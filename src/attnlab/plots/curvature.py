"""The curvature stage's figure: coarse curvature against coarse attention weight."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
import scipy.stats as sps

from attnlab import tables
from attnlab.plots import save_figure


def plot_curvature(table: str | Path, out: str | Path) -> None:
    """Coarse curvature against coarse attention weight per block pair (every head of one
    layer, diagonal blocks left out), pairs whose key block holds the needle in red."""
    df = tables.read(table, ["weight", "curvature", "needle", "diagonal"]).filter(
        ~pl.col("diagonal")
    )
    meta = tables.meta(table)
    fig, ax = plt.subplots(figsize=(6, 4.4))
    rest, needle = df.filter(~pl.col("needle")), df.filter(pl.col("needle"))
    floor = 1e-8
    ax.scatter(
        rest["weight"].clip(lower_bound=floor),
        rest["curvature"],
        s=3,
        alpha=0.25,
        color="0.4",
        label="block pairs",
        rasterized=True,
    )
    if not needle.is_empty():
        ax.scatter(
            needle["weight"].clip(lower_bound=floor),
            needle["curvature"],
            s=10,
            color="tab:red",
            label="key block holds the needle",
        )
    w, f = df["weight"].to_numpy(), df["curvature"].to_numpy()
    rho = float(sps.spearmanr(w, f).statistic) if len(w) > 1 else float("nan")
    ax.set_xscale("log")
    ax.set_xlabel(f"coarse attention weight A ({meta.get('adjacency', '?')})")
    ax.set_ylabel(f"Forman-Ricci curvature F ({meta.get('graph', '?')})")
    ax.set_title(
        f"{meta.get('model', '?')} layer {meta.get('layer', '?')}, {meta.get('length', '?')} "
        f"tokens, needle depth {meta.get('depth', '?')} ({meta.get('haystack', '?')} haystack)\n"
        f"blocks of {meta.get('block_size', '?')}; Spearman ρ(A, F) = {rho:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    save_figure(fig, out)


def render(figure: str, table: list[str], out: str, **_) -> None:
    """Draw ``curvature`` from the curvature table ``table[0]`` to ``out``."""
    plot_curvature(table[0], out)
