"""Figure: one generated token's attention per policy against dense, from the decode
benchmark's table alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

from attnlab.plots import save_figure

STYLES = {
    "evicted": {"color": "0.4", "linestyle": "--"},
    "topk": {"color": "black", "linestyle": ":"},
    "quest": {"color": "tab:blue"},
    "sparq": {"color": "tab:orange"},
    "loki": {"color": "tab:green"},
    "two_stage": {"color": "tab:purple"},
}


def plot_decode_bench(table: str | Path, out: str | Path) -> None:
    """Speedup against dense attention over the same cache (log scale) per target
    sparsity: a panel per (layer shape, cache length), a line per policy; 1 marked."""
    df = pl.read_parquet(table).filter(pl.col("policy") != "dense")
    panels = df.select("shape", "cache").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (shape, cache) in zip(axes[0], panels, strict=True):
        d = df.filter((pl.col("shape") == shape) & (pl.col("cache") == cache))
        for policy in d["policy"].unique(maintain_order=True):
            p = d.filter(pl.col("policy") == policy).sort("target_sparsity")
            ax.plot(
                p["target_sparsity"],
                p["speedup_vs_dense"],
                marker="o",
                label=policy,
                **STYLES.get(policy, {}),
            )
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        ax.set_yscale("log")
        row = d.row(0, named=True)
        ax.set_title(
            f"{shape} ({row['heads']}q/{row['kv_heads']}kv x {row['head_dim']}), "
            f"{cache // 1024}k cache",
            fontsize=9,
        )
        ax.set_xlabel("target sparsity")
    axes[0][0].set_ylabel("speedup vs dense decode (x)")
    axes[0][-1].legend(fontsize=7)
    env = df.row(0, named=True)
    fig.suptitle(
        f"One decode step's attention, select + gather + attend ({env['dtype']}, "
        f"{env.get('gpu') or 'CPU'}, torch {env['torch']})",
        fontsize=10,
    )
    save_figure(fig, out)
