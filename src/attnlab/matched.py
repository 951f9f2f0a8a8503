"""The accuracy-matched table (DESIGN: Accuracy-matched point): per (regime, policy) the
highest sparsity at which it keeps at least 90% of full attention's correct answers on
the same prompts, and its measured speedup there, the attention's alone and end to end.

Speeds come from the benchmarks, each only for the selection it timed: the cache regime
from ``attnlab bench decode`` (one generated token's attention over a cache of the
prompt's length: Quest and SparQ their own select + gather + attend, top-k the oracle's,
an evicting policy an evicted cache of the budget's size) and, end to end, from
``attnlab bench generate`` (the real model's decode step under the scored policy, where it
was timed); the prefill regime from
``attnlab bench prefill``, where its rows record the selection form the NIAH rows
scored: end to end the whole prefill, the attention's alone as full attention's
``attention_ms`` over the policy's ``selection_ms`` + ``attention_ms`` (its predictor
counts as attention). A speed not measured is NaN, and a policy that qualifies at no
sparsity has a null ``matched_sparsity``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from attnlab import tables
from attnlab.errors import UserError
from attnlab.jobs import NiahMatched

SHARE = 0.9  # of full attention's correct answers
EVICTING = {"h2o", "streamingllm", "snapkv"}  # decode over an evicted cache
# their own step in the decode benchmark
DECODE_KERNELS = {"topk", "quest", "sparq", "loki", "two_stage"}


def points(niah: pl.DataFrame, length: int, decode=None, prefill=None, shape=None, generate=None):
    """Per (regime, policy, target sparsity) of a NIAH table's ``length`` passkey prompts:
    correct answers beside full attention's, whether every prompt reached the target,
    and the measured speedups (see :func:`_speeds`). decode, prefill, generate: the
    benchmarks' tables or None; shape: the decode benchmark's layer shape."""
    df = niah.filter((pl.col("length") == length) & (pl.col("task") == "passkey"))
    if "selection" not in df.columns:
        df = df.with_columns(selection=pl.lit(None, pl.String))
    full = (
        df.filter(pl.col("policy") == "full")
        .group_by("regime")
        .agg(pl.col("correct").sum().alias("full_correct"))
    )
    per = (
        df.filter(pl.col("policy") != "full")
        .group_by("regime", "policy", "target_sparsity")
        .agg(
            pl.col("correct").sum(),
            pl.col("feasible").all(),
            pl.col("achieved_sparsity").mean(),
            pl.col("selection").first(),
            pl.len().alias("prompts"),
        )
        .join(full, on="regime", how="left")
        .sort("regime", "policy", "target_sparsity")
    )
    speeds = [
        _speeds(r, length, decode, prefill, shape, generate) for r in per.iter_rows(named=True)
    ]
    return per.with_columns(
        share=pl.col("correct") / pl.col("full_correct"),
        attention_speedup=pl.Series([a for a, _ in speeds], dtype=pl.Float64),
        end_to_end_speedup=pl.Series([e for _, e in speeds], dtype=pl.Float64),
    )


def matched(pts: pl.DataFrame) -> pl.DataFrame:
    """Per (regime, policy) the highest target sparsity whose prompts all reached it and
    kept at least ``SHARE`` of full attention's correct answers, with its point's values;
    null sparsity (and values) where none did."""
    ok = pts.filter((pl.col("share") >= SHARE) & pl.col("feasible"))
    best = ok.sort("target_sparsity").group_by("regime", "policy").last()
    keys = pts.select("regime", "policy", "full_correct", "prompts").unique(["regime", "policy"])
    cols = ["achieved_sparsity", "correct", "share", "attention_speedup", "end_to_end_speedup"]
    best = best.select(
        "regime", "policy", pl.col("target_sparsity").alias("matched_sparsity"), *cols
    )
    return keys.join(best, on=["regime", "policy"], how="left").sort("regime", "policy")


def _speeds(point: dict, length: int, decode, prefill, shape, generate=None):
    """(attention, end to end) speedups of a point (regime, policy, target sparsity and
    the selection form its rows record) from the benchmarks, NaN where none measured
    that selection."""
    nan = float("nan")
    regime, policy, sparsity = point["regime"], point["policy"], point["target_sparsity"]
    if sparsity is None:
        return nan, nan
    same = (pl.col("target_sparsity") - sparsity).abs() < 1e-9
    if regime == "cache":
        attention = end_to_end = nan
        step = "evicted" if policy in EVICTING else policy
        if decode is not None and (step in DECODE_KERNELS or step == "evicted"):
            d = decode.filter(
                (pl.col("shape") == shape)
                & (pl.col("cache") == length)
                & (pl.col("policy") == step)
                & same
            )
            attention = float(d["speedup_vs_dense"][0]) if d.height else nan
        if generate is not None:  # the scored policy itself, in the real model
            g = generate.filter((pl.col("policy") == policy) & (pl.col("length") == length) & same)
            end_to_end = float(g["speedup_vs_full"][0]) if g.height else nan
        return attention, end_to_end
    if regime == "prefill" and prefill is not None and "selection" in prefill.columns:
        p = prefill.filter(
            (pl.col("policy") == policy)
            & (pl.col("selection") == point["selection"])
            & (pl.col("implementation") == "attnlab")
            & same
        )
        if p.height:
            return _prefill_attention(prefill, p), float(p["speedup_vs_full"][0])
    return nan, nan


def _prefill_attention(prefill: pl.DataFrame, row: pl.DataFrame) -> float:
    """Full attention's attention time over the policy's selection and attention, from
    the same benchmark run; NaN where the run has no phase split."""
    full = prefill.filter((pl.col("policy") == "full") & (pl.col("implementation") == "attnlab"))
    if "attention_ms" not in prefill.columns or not full.height:
        return float("nan")
    spent = float(row["selection_ms"][0]) + float(row["attention_ms"][0])
    return float(full["attention_ms"][0]) / spent if spent > 0 else float("nan")


def write_matched(job: NiahMatched) -> None:
    """``attnlab niah-matched``: the matched table at ``job.out`` (its points beside it,
    ``<out>_points.parquet``) and the figure at ``job.fig``, at the NIAH table's longest
    prompt length and its model's layer shape in the decode benchmark."""
    cols = ["model", "regime", "policy", "target_sparsity", "achieved_sparsity", "length", "task"]
    niah = tables.read(job.table, cols)
    decode = job.decode
    bench = pl.read_csv(decode) if decode.endswith(".csv") else pl.read_parquet(decode)
    models = niah["model"].unique().to_list()
    if len(models) != 1 or models[0] not in bench["shape"].to_list():
        raise UserError(
            f"{job.table}: one model whose shape {decode} times is needed, got {models}"
        )
    pre = pl.read_parquet(job.prefill) if job.prefill else None
    length = int(niah["length"].max())
    gen = pl.read_parquet(job.generate) if job.generate else None
    pts = points(niah, length, bench, pre, models[0], gen)
    meta = {"length": length, "share": SHARE, "shape": models[0]}
    out = Path(job.out)
    tables.write(matched(pts).to_arrow(), job.out, meta=meta)
    tables.write(pts.to_arrow(), out.with_name(out.stem + "_points.parquet"), meta=meta)
    from attnlab.plots.matched import plot_matched

    plot_matched(pts, meta, job.fig)
