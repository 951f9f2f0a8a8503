"""Paired comparisons of NIAH accuracy: each policy against full attention and against
the best other policy, on the same prompts.

Two policies' accuracy intervals, each bootstrapped over prompts on its own, say little
about which is better: a claim such as "CAB beats H2O at 99%" is about the same prompts
under both. Prompts are paired by identity (model, task, length, depth, sample) within a
(model, regime, task, target sparsity); full attention has rows in both regimes, so it
pairs within its regime. The interval of a difference comes from one bootstrap over
prompts shared by every policy of the group (:func:`attnlab.stats.cluster_bootstrap`).
The "best other policy" of a policy is the most accurate other one at that sparsity
(ties: by name), leaving out the ``topk`` oracle, which is the ceiling, not a rival.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from attnlab.errors import UserError
from attnlab.jobs import NiahPaired
from attnlab.stats import cluster_bootstrap, percentile_interval

PROMPT_KEYS = ["haystack", "length", "depth", "sample"]
GROUP_KEYS = ["model", "regime", "task"]
COLUMNS = [*GROUP_KEYS, *PROMPT_KEYS, "policy", "target_sparsity", "correct", "feasible"]
ORACLES = ("topk",)


def _wide(runs: pl.DataFrame, full: pl.DataFrame, where: str) -> tuple[list[str], np.ndarray]:
    """Policies (full attention last) and the (prompts, policies) 0/1 matrix of their
    correct answers, paired by prompt; a policy that misses a prompt is an error."""
    wide = full.select(*PROMPT_KEYS, pl.col("correct").alias("full"))
    policies = sorted(runs["policy"].unique().to_list())
    for policy in policies:
        one = runs.filter(pl.col("policy") == policy).select(
            *PROMPT_KEYS, pl.col("correct").alias(policy)
        )
        joined = wide.join(one, on=PROMPT_KEYS, how="inner")
        if joined.height != wide.height or joined.height != one.height:
            raise UserError(
                f"NIAH rows of {policy} {where} do not cover the same prompts as full "
                f"attention's ({one.height} rows against {wide.height})"
            )
        wide = joined
    cols = [*policies, "full"]
    return cols, wide.select(cols).to_numpy().astype(np.float64)


def paired_rows(df: pl.DataFrame, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (model, regime, task, target sparsity, policy): accuracy, and its
    difference to full attention and to the best other policy with 95% paired bootstrap
    intervals over prompts, and whether each interval excludes zero. df: a NIAH table."""
    rows = []
    for key, group in df.sort(COLUMNS[:-2]).group_by(GROUP_KEYS, maintain_order=True):
        full = group.filter(pl.col("policy") == "full")
        if full.is_empty():
            continue
        runs_by_sparsity = group.filter(pl.col("policy") != "full").group_by(
            "target_sparsity", maintain_order=True
        )
        for (sparsity,), runs in runs_by_sparsity:
            where = f"({', '.join(map(str, key))}, sparsity {sparsity})"
            for covered in _by_coverage(runs):
                shared = full.join(covered.select(PROMPT_KEYS).unique(), on=PROMPT_KEYS, how="semi")
                rows += _compare(key, sparsity, covered, shared, resamples, seed, where)
    return rows


def _by_coverage(runs: pl.DataFrame) -> list[pl.DataFrame]:
    """The runs split by the prompts each policy covers (a policy run at one length of a
    study only), so policies are paired on the prompts they share with each other and with
    full attention, never on fewer for the sake of one policy's partial coverage."""
    cover: dict[tuple, list[str]] = {}
    for (policy,), one in runs.group_by("policy", maintain_order=True):
        cover.setdefault(tuple(sorted(one.select(PROMPT_KEYS).rows())), []).append(policy)
    return [runs.filter(pl.col("policy").is_in(names)) for names in cover.values()]


def _compare(key, sparsity, runs, full, resamples, seed, where) -> list[dict]:
    """The paired rows of one (model, regime, task, sparsity) and one prompt coverage."""
    policies, correct = _wide(runs, full, where)  # (P, K + 1)
    acc = correct.mean(0)  # (K + 1,)
    boot = cluster_bootstrap(correct, resamples, seed) / len(correct)  # (R, K + 1)
    feasible = dict(runs.group_by("policy").agg(pl.col("feasible").all()).iter_rows())
    rows = []
    for k, policy in enumerate(policies[:-1]):
        others = [j for j, p in enumerate(policies[:-1]) if j != k and p not in ORACLES]
        best = max(others, key=lambda j: acc[j], default=None)  # first on ties
        row = dict(zip(GROUP_KEYS, key, strict=True)) | {
            "target_sparsity": sparsity,
            "policy": policy,
            "accuracy": float(acc[k]),
            "feasible": bool(feasible[policy]),
            "prompts": len(correct),
            "resampled": "prompt",
            "full_accuracy": float(acc[-1]),
        }
        row |= _difference("full", acc[k] - acc[-1], boot[:, k] - boot[:, -1])
        row["best_other"] = policies[best] if best is not None else None
        row["best_other_accuracy"] = float(acc[best]) if best is not None else np.nan
        if best is None:
            row |= _difference("best", np.nan, np.full(1, np.nan))
        else:
            row |= _difference("best", acc[k] - acc[best], boot[:, k] - boot[:, best])
        rows.append(row)
    return rows


def _difference(name: str, diff: float, boot: np.ndarray) -> dict:
    """Columns diff_<name>, its interval and whether that interval excludes zero."""
    lo, hi = percentile_interval(boot) if np.isfinite(boot).any() else (np.nan, np.nan)
    return {
        f"diff_{name}": float(diff),
        f"diff_{name}_lo": float(lo),
        f"diff_{name}_hi": float(hi),
        f"{name}_excludes_zero": bool(lo > 0 or hi < 0),
    }


def write_paired(job: NiahPaired) -> None:
    """The paired rows (:func:`paired_rows`) of the NIAH table ``job.table``."""
    from attnlab import tables

    rows = paired_rows(tables.read(job.table, COLUMNS), job.resamples, job.seed)
    meta = {"table": job.table, "resamples": job.resamples, "seed": job.seed}
    tables.write(rows, job.out, meta=meta)
