"""One end-to-end Snakemake run on a tiny config with the real Gemma-3-270M."""

import polars as pl
import pytest
import yaml

from workflow_helpers import copy_workflow, planned_jobs, snakemake

TINY = {
    "models": ["gemma3-270m"],
    "niah": {
        "lengths": [512, 1024],
        "depths": [0.0, 0.5, 1.0],
        "samples": 1,
        "policies": ["streamingllm"],
        "sparsities": [0.9],
    },
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e"), TINY)
    snakemake(workdir, "--cores", "2", "figs/niah_heatmap_90.png")
    return workdir


def test_full_attention_retrieves_every_passkey(run_dir):
    df = pl.read_parquet(run_dir / "results/niah/niah.parquet")
    full = df.filter(pl.col("policy") == "full")
    assert full.height == 6 and full["correct"].all()
    assert (full["needle_kept"] == 1.0).all() and (full["achieved_sparsity"] == 0.0).all()
    sparse = df.filter(pl.col("policy") == "streamingllm")
    assert sparse.height == 6
    assert ((sparse["achieved_sparsity"] - 0.9).abs() < 0.01).all()
    assert set(df.columns) >= {
        "model",
        "length",
        "depth",
        "sample",
        "policy",
        "target_sparsity",
        "achieved_sparsity",
        "correct",
        "needle_kept",
        "generated",
        "seconds",
        "feasible",
    }


def test_heatmap_is_a_rendered_png(run_dir):
    png = (run_dir / "figs/niah_heatmap_90.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_rerun_has_nothing_to_do(run_dir):
    proc = snakemake(run_dir, "-n", "figs/niah_heatmap_90.png")
    assert planned_jobs(proc) == {}, proc.stdout


def test_new_sparsity_reruns_only_scoring_and_figures(run_dir):
    cfg = yaml.safe_load((run_dir / "tiny.yaml").read_text())
    cfg["niah"]["sparsities"] = [0.9, 0.95]
    (run_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(run_dir, "-n", "figs/niah_heatmap_90.png"))
    assert jobs == {"niah_score": 1, "niah_table": 1, "niah_heatmap": 1}
