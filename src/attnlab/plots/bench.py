"""Figure: the capture benchmark, throughput and peak memory per method."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

from attnlab.plots import save_figure


def summary(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Median tokens/s and peak memory per (model, method)."""
    out = {}
    for key in dict.fromkeys((r["model"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["method"]) == key]
        out[key] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "peak_mem_mib": statistics.median(r["peak_mem_mib"] for r in mine),
        }
    return out


def plot_capture_bench(table: str | Path, out: str | Path) -> None:
    """A row of two panels per model: tokens per second and peak memory, medians as bars
    and every repeat as a dot.

    Reads only the capture benchmark's table (``attnlab bench capture``); the title gives
    the model, device, threads, chunks and the capture's ratios to the straightforward
    approach.
    """
    rows = pl.read_parquet(table).to_dicts()
    med = summary(rows)
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        len(model_names), 2, figsize=(9, 3 * len(model_names)), squeeze=False, layout="constrained"
    )
    for row_axes, model in zip(axes, model_names, strict=True):
        names = [m for (mo, m) in med if mo == model]
        for ax, key, label in (
            (row_axes[0], "tokens_per_s", "tokens per second"),
            (row_axes[1], "peak_mem_mib", "peak memory above baseline (MiB)"),
        ):
            vals = [med[model, n][key] for n in names]
            bars = ax.bar(range(len(names)), vals, color=["tab:blue", "tab:gray", "tab:olive"])
            ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=7)
            for i, name in enumerate(names):
                pts = [r[key] for r in rows if r["method"] == name and r["model"] == model]
                ax.scatter([i] * len(pts), pts, color="k", s=8, zorder=3)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
        r0 = next(r for r in rows if r["model"] == model)
        ours, base = med[model, "capture"], med[model, "output_attentions"]
        row_axes[0].set_title(
            f"{model} on {r0['device']} ({r0['threads']} threads), {r0['chunks']} x "
            f"{r0['chunk_len']} tokens, batch {r0['batch_size']}: capture "
            f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}x the throughput, "
            f"{ours['peak_mem_mib'] / max(base['peak_mem_mib'], 1e-9):.3f}x the memory",
            fontsize=8,
            loc="left",
        )
    save_figure(fig, out)
