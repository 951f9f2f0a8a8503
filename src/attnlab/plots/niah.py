"""Needle-in-a-haystack figures, drawn from the NIAH table alone."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.patches import Rectangle

from attnlab import tables
from attnlab.plots import needs, save_figure
from attnlab.plots.styles import (
    HEATMAP_WIDTH,
    group_rows,
    haystack_of,
    in_group,
    ordered,
    panel_rows,
    policy_styles,
    shown_name,
)
from attnlab.stats import bootstrap_ci

COLUMNS = [
    "model",
    "regime",
    "task",
    "policy",
    "target_sparsity",
    "length",
    "depth",
    "correct",
    "feasible",
]
REGIME_TITLES = {
    "cache": "cache regime (dense prefill)",
    "prefill": "prefill regime (sparse prompt)",
}


def _row_label(model: str, regime: str) -> str:
    return f"{model}\n{REGIME_TITLES.get(regime, regime)}"


TASK_TITLES = {
    "passkey": "Passkey retrieval",
    "multikey": "Multi-key retrieval (one of several keys asked)",
    "multivalue": "Multi-value retrieval (every value of one key asked)",
    "multiquery": "Multi-query retrieval (several keys asked)",
}


def one_task(df: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    """The rows of the table's first task (passkey when present): the heatmaps and the
    summary show one task; figs/niah_tasks.png shows them all."""
    tasks = df["task"].unique(maintain_order=True).to_list()
    task = "passkey" if "passkey" in tasks else tasks[0]
    return df.filter(pl.col("task") == task), task


def plot_heatmap(table: str | Path, sparsity: float, out: str | Path) -> None:
    """Accuracy per (context length, needle depth): a panel per policy, a row per (model,
    regime).

    Full attention has its own first panel in every row; a (model, regime) with more than
    ``HEATMAP_WIDTH`` panels wraps into several rows. Cells where the policy could not
    reach the target sparsity are hatched; the number in each cell is the accuracy; a
    policy not run in a row's regime leaves its panel blank.
    """
    df, task = one_task(tables.read(table, COLUMNS))
    rows = panel_rows(df)
    policies = ordered(df["policy"].unique())
    width = min(len(policies), HEATMAP_WIDTH)
    wraps = -(-len(policies) // width)
    lengths = sorted(df["length"].unique().to_list())
    depths = sorted(df["depth"].unique().to_list())
    sel = df.filter(
        (pl.col("policy") == "full") | (pl.col("target_sparsity") - sparsity).abs().lt(1e-9)
    )
    fig, axes = plt.subplots(
        len(rows) * wraps,
        width,
        squeeze=False,
        figsize=(2.6 * width + 1, 2.4 * len(rows) * wraps + 0.8),
    )
    cmap = plt.get_cmap("viridis")
    n_per_cell = 0
    for r, (model, regime) in enumerate(rows):
        for c in range(len(policies), wraps * width):  # the wrapped row's empty panels
            axes[r * wraps + c // width][c % width].axis("off")
        for c, policy in enumerate(policies):
            ax = axes[r * wraps + c // width][c % width]
            cell = (
                sel.filter(
                    (pl.col("model") == model)
                    & (pl.col("regime") == regime)
                    & (pl.col("policy") == policy)
                )
                .group_by("length", "depth")
                .agg(pl.col("correct").mean().alias("acc"), pl.col("feasible").all(), pl.len())
            )
            grid = np.full((len(depths), len(lengths)), np.nan)
            for row in cell.iter_rows(named=True):
                i, j = depths.index(row["depth"]), lengths.index(row["length"])
                grid[i, j] = row["acc"]
                n_per_cell = max(n_per_cell, row["len"])
                if not row["feasible"]:
                    ax.add_patch(
                        Rectangle(
                            (j - 0.5, i - 0.5),
                            1,
                            1,
                            fill=False,
                            hatch="///",
                            edgecolor="0.85",
                            linewidth=0,
                        )
                    )
                ax.text(
                    j,
                    i,
                    f"{row['acc']:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if row["acc"] > 0.5 else "white",
                )
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, origin="upper", aspect="auto")
            if cell.is_empty():
                ax.text(
                    0.5,
                    0.5,
                    f"not run in the\n{regime} regime",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="0.4",
                    transform=ax.transAxes,
                )
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("tokens", fontsize=7)
            if c % width == 0:
                ax.set_ylabel(f"{_row_label(model, regime)}\nneedle depth (0 = start)")
            shown = shown_name(sel.filter(pl.col("regime") == regime), policy)
            title = "full attention" if policy == "full" else f"{shown} @ {sparsity:.0%}"
            ax.set_title(title, fontsize=9)
    haystack = haystack_of(df, tables.meta(table))
    fig.suptitle(
        f"{TASK_TITLES[task]}, target sparsity {sparsity:.0%} (haystack: {haystack}; "
        f"n = {n_per_cell} per cell; hatched = target not reached)",
        fontsize=10,
    )
    fig.subplots_adjust(hspace=0.6, top=1 - 0.9 / fig.get_figheight())
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    save_figure(fig, out)


def _threshold_only(run: pl.DataFrame) -> bool:
    """Whether a policy's rows ran without a budget cap (XAttention's ``threshold_only``):
    every target then gives the same run."""
    if "policy_params" not in run.columns or run["policy_params"].is_null().all():
        return False
    return bool(json.loads(run["policy_params"][0]).get("threshold_only", False))


def _accuracy_panel(ax, d: pl.DataFrame, seed: int) -> int:
    """Accuracy against target sparsity per policy on one axis, full attention dashed
    with its band, bootstrap 95% intervals, hollow where the target was missed.
    Returns the prompts per point."""
    full = d.filter(pl.col("policy") == "full")["correct"].to_numpy()
    if full.size:
        lo, hi = bootstrap_ci(full, seed=seed)
        ax.axhline(full.mean(), color="0.3", linestyle="--", label=f"full (n={full.size})")
        ax.axhspan(lo, hi, color="0.8", alpha=0.5)
    styles = policy_styles(d["policy"].unique())
    for policy in [p for p in ordered(d["policy"].unique()) if p != "full"]:
        run = d.filter(pl.col("policy") == policy)
        if _threshold_only(run):  # no budget: one run, drawn at the sparsity it achieved
            run = run.filter(pl.col("target_sparsity") == run["target_sparsity"].min())
            at = float(run["achieved_sparsity"].mean())
            run = run.with_columns(target_sparsity=pl.lit(at))
            label = f"{policy} (threshold only: {at:.1%} achieved)"
            _accuracy_line(ax, run, "target_sparsity", label, seed, **styles[policy])
            continue
        _accuracy_line(ax, run, "target_sparsity", policy, seed, **styles[policy])
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    return full.size


def plot_summary(
    table: str | Path, out: str | Path, seed: int = 0, paired: str | Path | None = None
) -> None:
    """Accuracy against target sparsity per policy, with bootstrap 95% intervals over prompts.

    A panel per (model, regime); full attention is the dashed line with its band. Points whose
    target was not reached on every prompt are drawn hollow. With the ``paired`` table
    (niah-paired), a point is marked where the paired interval of its difference to full
    attention (†) or to the best other policy (*) excludes zero.
    """
    df, task = one_task(tables.read(table, COLUMNS))
    marks = None
    if paired is not None:
        marks = tables.read(paired, PAIRED_COLUMNS).filter(pl.col("task") == task)
    rows = panel_rows(df)
    fig, axes = plt.subplots(1, len(rows), squeeze=False, figsize=(4.5 * len(rows), 3.6))
    for ax, (model, regime) in zip(axes[0], rows, strict=True):
        d = df.filter((pl.col("model") == model) & (pl.col("regime") == regime))
        n = _accuracy_panel(ax, d, seed)
        if marks is not None:
            _paired_marks(
                ax, marks.filter((pl.col("model") == model) & (pl.col("regime") == regime))
            )
        ax.set_title(f"{model}, {regime} regime (n = {n} prompts per point)", fontsize=9)
    note = (
        "\npaired 95% interval over prompts excludes 0 (beside the point, in its colour): "
        "† against full attention, * against the best other policy"
        if marks is not None
        else ""
    )
    fig.suptitle(
        f"{TASK_TITLES[task]} against sparsity, bootstrap 95% intervals "
        f"(hollow = target not reached){note}",
        fontsize=10,
        y=1.02 + 0.04 * bool(note),
    )
    save_figure(fig, out)


PAIRED_COLUMNS = [
    "model",
    "regime",
    "task",
    "policy",
    "target_sparsity",
    "accuracy",
    "full_excludes_zero",
    "best_excludes_zero",
]


def _paired_marks(ax, marks: pl.DataFrame) -> None:
    """† / * beside each point whose paired difference to full attention / to the best
    other policy excludes zero (rows of the niah-paired table for one panel)."""
    colors = {
        label: handle.lines[0].get_color()
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)
        if hasattr(handle, "lines")
    }
    stacked: dict[tuple[float, float], int] = {}  # marks already beside a point
    for r in marks.sort("policy").iter_rows(named=True):
        text = "†" * r["full_excludes_zero"] + "*" * r["best_excludes_zero"]
        if text:
            point = (r["target_sparsity"], r["accuracy"])
            stacked[point] = stacked.get(point, -1) + 1
            ax.annotate(
                text,
                point,
                textcoords="offset points",
                xytext=(4, -3 + 7 * stacked[point]),  # policies at one point: a column
                fontsize=7,
                color=colors.get(r["policy"], "black"),
            )


def plot_tasks(table: str | Path, out: str | Path, seed: int = 0) -> None:
    """Accuracy against target sparsity per policy for every task: a column per task, a
    row per (model, regime); a prompt counts only when every asked value was generated."""
    df = tables.read(table, COLUMNS)
    rows = panel_rows(df)
    tasks = df["task"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(
        len(rows),
        len(tasks),
        squeeze=False,
        figsize=(4.2 * len(tasks), 3.4 * len(rows) + 0.6),
    )
    for r, (model, regime) in enumerate(rows):
        for c, task in enumerate(tasks):
            d = df.filter(
                (pl.col("model") == model) & (pl.col("regime") == regime) & (pl.col("task") == task)
            )
            n = _accuracy_panel(axes[r][c], d, seed)
            axes[r][c].set_title(f"{model}, {regime}: {task} (n = {n})", fontsize=9)
    meta = tables.meta(table)
    fig.suptitle(
        f"Retrieval tasks against sparsity ({meta.get('needles', '?')} needles in the "
        f"multi-needle tasks; haystack: {haystack_of(df, meta)}; bootstrap 95% "
        "intervals; hollow = target not reached)",
        fontsize=10,
    )
    save_figure(fig, out)


def plot_length(table: str | Path, out: str | Path, seed: int = 0) -> None:
    """Accuracy against prompt length per policy: a row per (model, regime, policy group),
    a column per target sparsity; full attention (the same in every column) dashed and the
    oracle dotted in every panel, bootstrap 95% intervals over the prompts of each length,
    hollow where the target was missed."""
    df, task = one_task(tables.read(table, COLUMNS))
    rows = group_rows(df)
    sparsities = sorted(s for s in df["target_sparsity"].unique() if s > 0)
    fig, axes = plt.subplots(
        len(rows),
        len(sparsities),
        squeeze=False,
        sharey=True,
        figsize=(4.4 * len(sparsities), 3.0 * len(rows) + 0.6),
    )
    lengths = sorted(df["length"].unique())
    styles = policy_styles(df["policy"].unique())
    for r, (model, regime, group) in enumerate(rows):
        d = df.filter((pl.col("model") == model) & (pl.col("regime") == regime))
        for c, s in enumerate(sparsities):
            ax = axes[r][c]
            runs = d.filter(
                (pl.col("policy") == "full") | ((pl.col("target_sparsity") - s).abs() < 1e-9)
            )
            for policy in (p for p in ordered(runs["policy"].unique()) if in_group(p, group)):
                run = runs.filter(pl.col("policy") == policy)
                label = shown_name(run, policy)
                _accuracy_line(ax, run, "length", label, seed, **styles[policy])
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{model}, {regime} regime, {s:.0%}: {group}", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("prompt length (tokens)")
            if c == 0:
                ax.set_ylabel("retrieval accuracy")
        axes[r][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.subplots_adjust(hspace=0.5, top=1 - 0.9 / fig.get_figheight())
    fig.suptitle(
        f"{TASK_TITLES[task]} against length, bootstrap 95% intervals over the prompts of "
        "each length (hollow = target not reached)",
        fontsize=10,
    )
    save_figure(fig, out)


def _accuracy_line(ax, d: pl.DataFrame, x: str, label: str, seed: int, **style) -> None:
    """One policy's accuracy against column ``x`` on ``ax``: the mean with a bootstrap 95%
    interval over the prompts of each point, hollow where the target was missed."""
    pts = d.group_by(x).agg(pl.col("correct"), pl.col("feasible").all()).sort(x)
    xs, ys, err = [], [], [[], []]
    for row in pts.iter_rows(named=True):
        vals = np.asarray(row["correct"], dtype=float)
        lo, hi = bootstrap_ci(vals, seed=seed)
        xs.append(row[x])
        ys.append(vals.mean())
        err[0].append(vals.mean() - lo)
        err[1].append(hi - vals.mean())
    line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, **style)
    hollow = [i for i, f in enumerate(pts["feasible"]) if not f]
    ax.scatter(
        [xs[i] for i in hollow],
        [ys[i] for i in hollow],
        s=60,
        zorder=3,
        facecolor="white",
        edgecolor=line[0].get_color(),
    )


def sparsity_label(ax, sparsity: float, x: float, y: float) -> None:
    """The target sparsity written beside a point."""
    ax.annotate(f"{sparsity:.0%}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")


def render(
    figure: str, table: list[str], out: str, sparsity=None, resamples=None, seed=None
) -> None:
    """Draw the NIAH figure ``figure`` from ``table`` to ``out`` (``niah-summary``: the
    NIAH table and, if given, its paired table)."""
    if figure == "niah-heatmap":
        plot_heatmap(table[0], out=out, **needs(figure, sparsity=sparsity))
    elif figure == "niah-tasks":
        plot_tasks(table[0], out, **needs(figure, seed=seed))
    elif figure == "niah-length":
        plot_length(table[0], out, **needs(figure, seed=seed))
    else:
        paired = (table[1:] or [None])[0]
        plot_summary(table[0], out, paired=paired, **needs(figure, seed=seed))
