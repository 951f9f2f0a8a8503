"""Attention-mass recall of the NIAH answering rows, by layer, beside accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from attnlab import tables
from attnlab.errors import UserError
from attnlab.plots import save_figure
from attnlab.plots.niah import COLUMNS, TASK_TITLES, one_task, sparsity_label
from attnlab.plots.styles import group_rows, in_group, ordered, policy_styles
from attnlab.stats import separation_auc


def plot_recall(table: str | Path, out: str | Path) -> None:
    """Attention-mass recall of the answering rows (``recall_by_layer``) at the longest
    prompt length that has it: for each (model, regime, policy group) a row of panels, one
    per target sparsity, with each policy's recall against layer (mean over prompts and
    heads; the top-k oracle's is the ceiling at that budget), and a last panel of accuracy against
    mean recall, a point per (policy, sparsity). Full attention keeps every weight (recall
    1) and is left out of the curves; rows scored before recall was recorded are too."""
    cols = [*COLUMNS, "attention_recall", "recall_by_layer"]
    df, task = one_task(tables.read(table, cols))
    df = df.filter((pl.col("policy") != "full") & pl.col("recall_by_layer").is_not_null())
    if df.is_empty():
        raise UserError(f"{table}: no rows with attention-mass recall")
    length = df["length"].max()
    df = df.filter(pl.col("length") == length)
    rows = group_rows(df)
    sparsities = sorted(df["target_sparsity"].unique())
    fig, axes = plt.subplots(
        len(rows),
        len(sparsities) + 1,
        squeeze=False,
        figsize=(3.8 * (len(sparsities) + 1), 3.2 * len(rows) + 0.6),
    )
    styles = policy_styles(df["policy"].unique())
    for r, (model, regime, group) in enumerate(rows):
        d = df.filter((pl.col("model") == model) & (pl.col("regime") == regime))
        d = d.filter(
            pl.col("policy").is_in([p for p in d["policy"].unique() if in_group(p, group)])
        )
        for c, s in enumerate(sparsities):
            ax = axes[r][c]
            at = d.filter(pl.col("target_sparsity") == s)
            for policy in ordered(at["policy"].unique()):
                run = at.filter(pl.col("policy") == policy)
                curves = np.array(run["recall_by_layer"].to_list(), dtype=float)
                ax.plot(curves.mean(0), marker=".", label=policy, **styles[policy])
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("layer")
            ax.set_title(f"{model}, {regime}, {s:.0%}: {group}", fontsize=8)
            if c == 0:
                ax.set_ylabel("attention mass kept")
        ax = axes[r][-1]
        pts = d.group_by("policy", "target_sparsity", maintain_order=True).agg(
            pl.col("attention_recall").mean(), pl.col("correct").cast(pl.Float64).mean()
        )
        for row in pts.iter_rows(named=True):
            x, y = row["attention_recall"], row["correct"]
            ax.scatter(x, y, color=styles[row["policy"]]["color"], label=row["policy"])
            sparsity_label(ax, row["target_sparsity"], x, y)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("mean attention mass kept")
        ax.set_ylabel("retrieval accuracy")
        # inside the panel, top left (low recall with high accuracy: rarely a point there)
        ax.text(
            0.02,
            0.98,
            separation_title(df, model, regime),
            transform=ax.transAxes,
            fontsize=7,
            va="top",
        )
        handles, labels = axes[r][-2].get_legend_handles_labels()
        ax.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.subplots_adjust(hspace=0.5, wspace=0.3, top=1 - 0.9 / fig.get_figheight())
    fig.suptitle(
        f"{TASK_TITLES[task]} at {length} tokens: full attention's weight on the kept keys "
        "at the answering rows, by layer",
        fontsize=10,
    )
    save_figure(fig, out)


RECALLS = {  # the recalls whose separation of correct from wrong answers is reported
    "attention_recall": "attention",
    "oracle_overlap": "oracle overlap",
    "needle_recall": "needle (retrieval heads)",
}


def separation_title(df: pl.DataFrame, model: str, regime: str) -> str:
    """AUC of each recall (per prompt row, every policy and sparsity of the model and
    regime) at telling correct answers from wrong ones: which recall to read."""
    d = df.filter((pl.col("model") == model) & (pl.col("regime") == regime))
    parts = []
    for column, name in RECALLS.items():
        if column in d.columns:
            rows = d.filter(pl.col(column).is_not_null() & pl.col(column).is_not_nan())
            auc = separation_auc(rows[column].to_numpy(), rows["correct"].to_numpy())
            parts.append(f"{name} {auc:.2f}")
    return "AUC, correct vs wrong:\n" + "\n".join(parts)  # one per line: the panel is narrow


def render(figure: str, table: list[str], out: str, **_) -> None:
    """Draw ``niah-recall`` from the NIAH table ``table[0]`` to ``out``."""
    plot_recall(table[0], out)
