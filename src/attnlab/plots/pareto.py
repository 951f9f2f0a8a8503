"""Perplexity against latency, and the CAB ablation."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import polars as pl

from attnlab import tables
from attnlab.plots import save_figure
from attnlab.policies.fields import label as policy_label

REGIME_NOTE = {
    "prefill": "every row under the policy",
    "cache": "dense context, the rest under the policy",
}


def _regimes(df: pl.DataFrame) -> list[str]:
    """The table's regimes in display order: prefill, then cache."""
    have = set(df["regime"].unique())
    return [r for r in ("prefill", "cache") if r in have]


def plot_pareto(table: str | Path, out: str | Path) -> None:
    """Perplexity (bootstrap interval over chunks) against ms per token, a column per
    regime: a line per policy through its sparsities, full attention a star; hollow
    points missed their target. Below each, the perplexity's ratio to full attention with
    its paired interval (chunks resampled jointly), the comparison that the two marginal
    intervals cannot make."""
    df = tables.read(
        table,
        ["model", "regime", "policy", "target_sparsity", "perplexity", "ppl_lo", "ppl_hi"]
        + ["ppl_ratio", "ratio_lo", "ratio_hi"]
        + ["ms_per_token", "feasible", "device", "chunks", "tokens"],
    ).sort("policy", "target_sparsity")
    regimes = _regimes(df)
    fig, axes = plt.subplots(2, len(regimes), figsize=(6.4 * len(regimes), 8.4), squeeze=False)
    for top, bottom, regime in zip(axes[0], axes[1], regimes, strict=True):
        _pareto_panel(top, df.filter(pl.col("regime") == regime))
        _pareto_panel(bottom, df.filter(pl.col("regime") == regime), ratio=True)
    first = df.row(0, named=True)
    fig.suptitle(
        f"{first['model']} on {first['device']}; hollow = target sparsity not reached",
        fontsize=10,
    )
    save_figure(fig, out)


def _pareto_panel(ax, df: pl.DataFrame, ratio: bool = False) -> None:
    """Perplexity against latency (``ratio``: its paired ratio to full attention)."""
    full = df.filter(pl.col("policy") == "full")
    colors = iter(plt.get_cmap("tab10").colors)
    y_col, lo_col, hi_col = (
        ("ppl_ratio", "ratio_lo", "ratio_hi") if ratio else ("perplexity", "ppl_lo", "ppl_hi")
    )
    for policy in [p for p in df["policy"].unique(maintain_order=True) if p != "full"]:
        run = df.filter(pl.col("policy") == policy)
        color = next(colors)
        x, y = run["ms_per_token"].to_numpy(), run[y_col].to_numpy()
        err = np.abs(np.stack([run[lo_col].to_numpy(), run[hi_col].to_numpy()]) - y)
        ax.plot(x, y, "-", color=color, alpha=0.6, label=policy_label(policy))
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor=color, capsize=2)
        feasible = run["feasible"].to_numpy()
        ax.scatter(x[feasible], y[feasible], color=color, zorder=3)
        ax.scatter(x[~feasible], y[~feasible], facecolor="white", edgecolor=color, zorder=3)
        for xi, yi, s in zip(x, y, run["target_sparsity"].to_list(), strict=True):
            ax.annotate(f"{s:.0%}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if ratio:
        ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    if not full.is_empty():
        f = full.row(0, named=True)
        ax.errorbar(
            f["ms_per_token"],
            f[y_col],
            yerr=[[f[y_col] - f[lo_col]], [f[hi_col] - f[y_col]]],
            fmt="*",
            color="black",
            markersize=12,
            capsize=2,
            label="full attention",
            zorder=4,
        )
    ax.set_yscale("log")
    ax.set_xlabel("latency (ms per row under the policy, median of the passes)")
    ax.set_ylabel(
        "perplexity / full attention's\n(95% paired bootstrap over chunks)"
        if ratio
        else "perplexity (95% bootstrap interval over chunks)"
    )
    if ratio:
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%.2f"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        return
    first = df.row(0, named=True)
    ax.set_title(
        f"{first['regime']} regime ({REGIME_NOTE[first['regime']]}):\n"
        f"{first['chunks']} held-out chunks, {first['tokens']} tokens scored",
        fontsize=9,
    )
    ax.legend(fontsize=8)


def plot_ablation(table: str | Path, out: str | Path) -> None:
    """NIAH accuracy, perplexity and perplexity over full attention's (paired interval
    over chunks) per policy variant, a row of panels per regime and a bar group per target
    sparsity, 95% bootstrap intervals on every bar; full attention (of that regime) as a
    dashed reference."""
    df = tables.read(
        table,
        ["model", "regime", "policy", "target_sparsity", "accuracy", "acc_lo", "acc_hi"]
        + ["prompts", "perplexity", "ppl_lo", "ppl_hi", "niah_feasible", "ppl_feasible"]
        + ["ppl_ratio", "ratio_lo", "ratio_hi", "recall", "recall_lo", "recall_hi"]
        + ["oracle_recall"],
    )
    regimes = _regimes(df)
    fig, axes = plt.subplots(len(regimes), 4, figsize=(21, 4.2 * len(regimes)), squeeze=False)
    for row, regime in zip(axes, regimes, strict=True):
        _ablation_row(row, df.filter(pl.col("regime") == regime), regime)
    first = df.row(0, named=True)
    fig.suptitle(
        f"{first['model']}: CAB against its ablations ({first['prompts']} prompts per bar; "
        "hatched = target sparsity not reached)",
        fontsize=10,
    )
    save_figure(fig, out)


def _ablation_row(axes, df: pl.DataFrame, regime: str) -> None:
    full = df.filter(pl.col("policy") == "full")
    runs = df.filter(pl.col("policy") != "full")
    policies = runs["policy"].unique(maintain_order=True).to_list()
    sparsities = sorted(runs["target_sparsity"].unique().to_list())
    width = 0.8 / max(len(sparsities), 1)
    panels = (
        ("accuracy", "acc", "NIAH accuracy (95% bootstrap interval)"),
        ("perplexity", "ppl", "perplexity (95% bootstrap interval)"),
        ("ppl_ratio", "ratio", "perplexity / full attention's\n(95% paired interval over chunks)"),
        ("recall", "recall", "attention mass kept at the answering rows\n(tick: top-k oracle's)"),
    )
    for ax, (col, pre, label) in zip(axes, panels, strict=True):
        for j, s in enumerate(sparsities):
            sel = runs.filter((pl.col("target_sparsity") - s).abs() < 1e-9)
            by = {r["policy"]: r for r in sel.iter_rows(named=True)}
            x = np.arange(len(policies)) + (j - (len(sparsities) - 1) / 2) * width
            y = np.array([by[p][col] if p in by else np.nan for p in policies])
            lo = np.array([by[p][f"{pre}_lo"] if p in by else np.nan for p in policies])
            hi = np.array([by[p][f"{pre}_hi"] if p in by else np.nan for p in policies])
            stage = "ppl" if pre in ("ppl", "ratio") else "niah"
            ok = [by[p][f"{stage}_feasible"] for p in policies]
            bars = ax.bar(x, y, width, yerr=[y - lo, hi - y], capsize=2, label=f"{s:.0%}")
            for bar, feasible in zip(bars, ok, strict=True):
                if not feasible:
                    bar.set_hatch("///")
            if col == "recall":
                ceiling = [by[p]["oracle_recall"] if p in by else np.nan for p in policies]
                ax.scatter(x, ceiling, marker="_", s=200, color="black", zorder=3)
        if not full.is_empty() and col != "recall":
            ax.axhline(full[col][0], color="black", ls="--", lw=1, label="full attention")
        ax.set_xticks(np.arange(len(policies)), [policy_label(p) for p in policies])
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{regime} regime ({REGIME_NOTE[regime]})", fontsize=9)
        ax.legend(title="target sparsity", fontsize=7, title_fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[3].set_ylim(0, 1.05)


FIGURES = {"pareto": plot_pareto, "ablation": plot_ablation}


def render(
    figure: str, table: list[str], out: str, sparsity=None, resamples=None, seed=None
) -> None:
    """Draw the perplexity or ablation figure ``figure`` from ``table[0]`` to
    ``out``."""
    FIGURES[figure](table[0], out)
