"""NIAH accuracy against real-model prefill latency (the accuracy-matched speed table)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

from attnlab import tables
from attnlab.errors import UserError
from attnlab.plots import save_figure
from attnlab.plots.niah import COLUMNS, REGIME_TITLES, one_task, sparsity_label
from attnlab.plots.styles import ordered, policy_styles


def accuracy_latency(niah_table: str | Path, bench_table: str | Path) -> pl.DataFrame:
    """Each (policy, target sparsity) of a prefill benchmark beside its ``prefill``-regime
    NIAH accuracy at the benchmark's prompt length: the accuracy-matched speed table (the
    regime whose prompt the benchmark times; a ``cache``-regime prefill is full
    attention's). A speed counts only for the selection whose accuracy is scored: rows
    pair where their selection forms agree, and a benchmark that does not record its
    forms (timed before they existed) is refused. Columns: policy, target_sparsity,
    selection, kernel, ms, speedup_vs_full, achieved_sparsity (of the timed prefill),
    regime, accuracy, prompts."""
    bench = pl.read_parquet(bench_table)
    if "selection" not in bench.columns:
        raise UserError(
            f"{bench_table} predates the selection forms, so its selections may not be the"
            " ones the NIAH table scored: rerun attnlab bench prefill"
        )
    if "implementation" in bench.columns:  # transformers' own rows have no accuracy here
        bench = bench.filter(pl.col("implementation") == "attnlab")
    length = bench["length"].unique().to_list()
    if len(length) != 1:
        raise ValueError(f"{bench_table} times {len(length)} lengths; expected one")
    df, _ = one_task(tables.read(niah_table, [*COLUMNS, "selection"]))
    full = pl.col("policy") == "full"  # no selection to differ
    df = df.with_columns(selection=pl.when(full).then(pl.lit("causal")).otherwise("selection"))
    acc = (
        df.filter((pl.col("length") == length[0]) & (pl.col("regime") == "prefill"))
        .group_by("regime", "policy", "target_sparsity", "selection")
        .agg(
            pl.col("correct").cast(pl.Float64).mean().alias("accuracy"),
            pl.len().alias("prompts"),
        )
    )
    keys = ["policy", "target_sparsity", "selection"]
    cols = [*keys, "kernel", "ms", "speedup_vs_full", "achieved_sparsity"]
    return bench.select(cols).join(acc, on=keys, how="inner").sort("regime", *keys)


def plot_latency(niah_table: str | Path, bench_table: str | Path, out: str | Path) -> None:
    """Prefill-regime NIAH accuracy against real-model prefill latency at the benchmark's
    length: one colour per policy (the same in every NIAH figure), its target sparsities
    written beside the points; full attention a grey star. The kernels each point took
    (they differ with the sparsity) are the benchmark table's, not the legend's."""
    df = accuracy_latency(niah_table, bench_table)
    regimes = df["regime"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(regimes), squeeze=False, sharey=True)
    fig.set_size_inches(5.2 * len(regimes), 4.0)
    colors = {p: s["color"] for p, s in policy_styles(df["policy"].unique()).items()}
    for ax, regime in zip(axes[0], regimes, strict=True):
        d = df.filter(pl.col("regime") == regime)
        for policy in ordered(d["policy"].unique()):
            p = d.filter(pl.col("policy") == policy).sort("target_sparsity")
            style = {"marker": "*", "s": 140} if policy == "full" else {"s": 36}
            c = [colors[policy]]  # the kernels each point took: the table's ``kernel``
            ax.scatter(p["ms"], p["accuracy"], label=policy, zorder=3, c=c, **style)
            if policy != "full":
                ax.plot(p["ms"], p["accuracy"], alpha=0.4, color=colors[policy])
                for row in p.iter_rows(named=True):
                    sparsity_label(ax, row["target_sparsity"], row["ms"], row["accuracy"])
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("prefill latency (ms, median)")
        ax.set_title(REGIME_TITLES.get(regime, regime), fontsize=9)
    axes[0][0].set_ylabel("retrieval accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    length = pl.read_parquet(bench_table)["length"][0]
    fig.suptitle(f"Accuracy against prefill latency at {length} tokens", fontsize=10)
    save_figure(fig, out)


def render(figure: str, table: list[str], out: str, **_) -> None:
    """Draw ``niah-latency`` from the NIAH table and the prefill benchmark's (``table``)."""
    if len(table) != 2:
        raise UserError("niah-latency takes --table NIAH_TABLE PREFILL_BENCH_TABLE")
    plot_latency(*table, out)
