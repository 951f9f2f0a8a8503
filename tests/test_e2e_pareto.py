"""End-to-end: perplexity, ablation and curvature figures with SmolLM2-135M on the built-in
corpus, the needle hidden in corpus text and in the noise filler, the cache regime in two
shards."""

import json

import numpy as np
import polars as pl
import pytest

from workflow_helpers import copy_workflow, snakemake

PARETO_FIGS = [f"figs/{k}_smollm2-135m.png" for k in ("pareto", "ablation", "curvature")]


@pytest.fixture(scope="module")
def pareto_dir(tmp_path_factory):
    """The perplexity, ablation and curvature figures from the built-in corpus, with the
    needle hidden in corpus text and in the noise filler (two prompts), the cache jobs in
    two shards of one prompt each."""
    cfg = {
        "models": ["smollm2-135m"],
        "corpus": {"chunk_len": 96, "max_chunks": 24, "shard_size": 8},
        "niah": {
            "lengths": [256],
            "depths": [0.5],
            "haystack": ["corpus", "noise"],
            "cache_shards": 2,
        },
        "pareto": {"policies": ["cab"], "sparsities": [0.75], "chunks": 3, "repeats": 1},
        # CAB and a named variant: the variant machinery (lambda variants are named the
        # same way, tests/test_workflow.py); baselines are ordinary policies
        "ablation": {
            "baselines": [],
            "lams": [1.0],
            "variants": ["cab_plan"],
            "sparsities": [0.75],
        },
        "curvature": {"layer": 3, "length": 256, "depth": 0.5},
    }
    workdir = copy_workflow(tmp_path_factory.mktemp("pareto"), cfg)
    snakemake(workdir, "--cores", "2", *PARETO_FIGS)
    return workdir


def test_pareto_table_from_the_builtin_corpus(pareto_dir):
    manifest = json.loads((pareto_dir / "results/corpus/smollm2-135m/manifest.json").read_text())
    assert manifest["source"] == "python-docs" and manifest["chunks"] == 24
    all_runs = pl.read_parquet(pareto_dir / "results/pareto/smollm2-135m.parquet")
    assert sorted(all_runs.select("regime", "policy").rows()) == [
        ("cache", "cab"),
        ("cache", "full"),
        ("prefill", "cab"),
        ("prefill", "full"),
    ]
    # the cache regime scores the tokens after the dense half of each 96-token chunk
    for regime, scored in (("prefill", 95), ("cache", 47)):
        df = all_runs.filter(pl.col("regime") == regime)
        full = pl.read_parquet(pareto_dir / f"results/pareto/{regime}/smollm2-135m/full_0.parquet")
        assert sorted(full["chunk"]) == [21, 22, 23]  # held out: the corpus's last chunks
        row = df.filter(pl.col("policy") == "full").row(0, named=True)
        ppl = np.exp(full["nll_sum"].sum() / full["tokens"].sum())
        assert row["perplexity"] == pytest.approx(ppl)
        assert row["tokens"] == 3 * scored and row["device"].startswith("cpu")
        assert (df["ppl_lo"] <= df["perplexity"]).all()
        assert (df["perplexity"] <= df["ppl_hi"]).all()
        assert (df["ms_per_token"] > 0).all()
        sparse_row = df.filter(pl.col("policy") == "cab").row(0, named=True)
        # 96-token rows: CAB's two must-keep blocks exceed the budget of the shorter rows
        assert 0.5 < sparse_row["achieved_sparsity"] < 0.75
        assert sparse_row["perplexity"] > row["perplexity"]


def test_ablation_table_has_every_variant_with_intervals(pareto_dir):
    df = pl.read_parquet(pareto_dir / "results/ablation/smollm2-135m.parquet")
    assert set(df["policy"]) == {"full", "cab", "cab_plan"}
    assert df.group_by("regime").len().sort("regime").rows() == [("cache", 3), ("prefill", 3)]
    sparse = df.filter(pl.col("policy") != "full")
    for lo, mid, hi in (("acc_lo", "accuracy", "acc_hi"), ("ppl_lo", "perplexity", "ppl_hi")):
        assert (df[lo] <= df[mid]).all() and (df[mid] <= df[hi]).all()
    assert (sparse["recall_lo"] <= sparse["recall"]).all()
    assert (sparse["recall"] <= sparse["recall_hi"]).all()
    for col in ("recall", "oracle_recall", "oracle_overlap"):  # 75%: some mass is lost
        assert sparse[col].is_between(0.0, 1.0).all() and (sparse[col] < 1.0).any()
    folder = pareto_dir / "results/niah/prefill/smollm2-135m"
    plan = json.loads(pl.read_parquet(folder / "cab_plan_75.parquet")["policy_params"][0])
    assert (plan["graph"], plan["adjacency"]) == ("rowsum", "dot")  # CAB's fields, the plan's
    assert plan["block_size"] == 16 and plan["lam"] == 1.0  # values; the rest is cab's
    prompts = pl.read_parquet(pareto_dir / "results/niah/smollm2-135m/prompts.parquet")
    assert prompts["haystack"].to_list() == ["corpus", "noise"]
    assert prompts["key"].n_unique() == 1  # a cell's key is the same on each haystack
    texts = [_decode_smollm2(ids) for ids in prompts["input_ids"].to_list()]
    assert "The grass is green" not in texts[0] and "The grass is green" in texts[1]
    # the cache regime in two shards, one prompt each, every run on each
    shards = [
        pl.read_parquet(pareto_dir / f"results/ablation/cache/smollm2-135m/all_{i}of2.parquet")
        for i in (1, 2)
    ]
    assert [s["haystack"].unique().to_list() for s in shards] == [["corpus"], ["noise"]]
    assert shards[0].select("regime", "policy").sort("regime", "policy").rows() == (
        shards[1].select("regime", "policy").sort("regime", "policy").rows()
    )


def test_curvature_table_marks_the_needle_blocks(pareto_dir):
    df = pl.read_parquet(pareto_dir / "results/curvature/smollm2-135m.parquet")
    assert df["head"].n_unique() == 9 and df["needle"].any()
    for fig in PARETO_FIGS:
        assert (pareto_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _decode_smollm2(ids):
    from transformers import AutoTokenizer

    from attnlab import models

    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m")).decode(ids)
