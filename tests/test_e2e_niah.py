"""End-to-end: the main job (needle in a haystack) on a tiny config with Gemma-3-270M, every
peer policy and the multi-key task; reruns, the report."""

import polars as pl
import pytest
import yaml

from workflow_helpers import copy_workflow, planned_jobs, snakemake

TINY = {
    "models": ["gemma3-270m"],
    "niah": {
        "lengths": [512],
        "depths": [0.0, 0.5, 1.0],
        "samples": 1,
        "regimes": {
            "cache": ["streamingllm", "snapkv", "quest", "sparq"],
            "prefill": ["xattention"],
        },
        "sparsities": [0.9],
        "tasks": ["passkey", "multikey"],
        "needles": 3,
    },
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e"), TINY, source=True)
    figs = ("figs/niah_heatmap_90.png", "figs/niah_tasks.png", "figs/niah_recall.png")
    snakemake(workdir, "--cores", "2", *figs)
    return workdir


def test_full_attention_retrieves_every_passkey(run_dir):
    df = pl.read_parquet(run_dir / "results/niah/niah.parquet")
    counts = df.group_by("regime", "task", "policy").len()
    assert counts["len"].to_list() == [3] * 14  # full in both regimes, 4 + 1 policies
    full = df.filter(pl.col("policy") == "full")
    assert full.filter(pl.col("task") == "passkey")["correct"].all()
    assert (full["needle_kept"] == 1.0).all()
    # full attention hides only what Gemma's own sliding windows hide, in both regimes
    assert (full["achieved_sparsity"] - full["model_sparsity"]).abs().max() < 1e-12
    # the cache job gives full attention's rows in both regimes (one dense prefill; that
    # its prefill-regime row equals a prefill-regime run's: tests/test_niah.py)
    by_regime = full.sort("regime", "task", "depth").partition_by("regime", as_dict=True)
    assert by_regime[("prefill",)]["decode"].unique().to_list() == ["dense"]
    assert not (run_dir / "results/niah/prefill/gemma3-270m/full_0.parquet").exists()
    multikey = full.filter(pl.col("task") == "multikey")
    assert multikey["key"].str.len_chars().to_list() == [5] * 6  # one of three keys asked
    sparse = df.filter(pl.col("policy") == "streamingllm")
    assert sparse.height == 6 and (sparse["regime"] == "cache").all()
    assert ((sparse["achieved_sparsity"] - 0.9).abs() < 0.01).all()
    for policy in ("snapkv", "quest", "sparq", "xattention"):  # they ran, sparsity measured
        peer = df.filter(pl.col("policy") == policy)
        assert peer.height == 6  # each masks pairs beyond those the model's windows hide
        assert (peer["achieved_sparsity"] > peer["model_sparsity"] + 0.2).all()
        assert peer["feasible"].to_list() == (peer["achieved_sparsity"] >= 0.895).to_list()
    assert set(df.columns) >= {
        "model",
        "regime",
        "decode",
        "task",
        "length",
        "depth",
        "sample",
        "policy",
        "target_sparsity",
        "achieved_sparsity",
        "model_sparsity",
        "correct",
        "needle_kept",
        "generated",
        "feasible",
        "read_cost",
    }
    # the share of the keys' bytes each predictor reads per row to choose, where stated:
    # Quest two vectors a 16-key page, SparQ 32 of Gemma's 256 channels
    cost = dict(df.group_by("policy").agg(pl.col("read_cost").first()).iter_rows())
    assert cost["quest"] == 2 / 16 and cost["sparq"] == 32 / 256
    assert cost["full"] != cost["full"] and cost["snapkv"] != cost["snapkv"]  # NaN: unstated
    assert "seconds" not in df.columns  # wall time is in benchmarks/, so tables are reproducible
    # attention-mass recall at the answering rows: every layer of Gemma 3 for a sparse
    # policy (its windowed layers too), nothing for full attention, which keeps it all
    sparse_rows = df.filter(pl.col("policy") != "full")
    assert sparse_rows["recall_by_layer"].list.len().unique().to_list() == [18]
    assert sparse_rows["attention_recall"].is_between(0.0, 1.0 + 1e-6).all()
    assert sparse_rows["oracle_overlap"].is_between(0.0, 1.0).all()
    assert full["attention_recall"].is_nan().all()


def test_heatmap_and_tasks_figure_are_rendered_pngs(run_dir):
    for fig in ("figs/niah_heatmap_90.png", "figs/niah_tasks.png", "figs/niah_recall.png"):
        png = (run_dir / fig).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_rerun_has_nothing_to_do(run_dir):
    proc = snakemake(run_dir, "-n", "figs/niah_heatmap_90.png")
    assert planned_jobs(proc) == {}, proc.stdout


def test_editing_a_policy_module_reruns_only_that_policys_scoring(run_dir):
    for name in ("streamingllm", "xattention"):
        module = run_dir / f"src/attnlab/policies/{name}.py"
        text = module.read_text()
        module.write_text(text + "# an edit\n")
        try:
            proc = snakemake(run_dir, "-n", "figs/niah_heatmap_90.png")
        finally:
            module.write_text(text)
        assert f"src/attnlab/policies/{name}.py" in proc.stdout
        assert planned_jobs(proc) == {"niah_score": 1, "niah_table": 1, "niah_heatmap": 1}


def test_report_holds_the_figure_with_its_caption(run_dir):
    import zipfile

    snakemake(run_dir, "--report", "report.zip", "figs/niah_heatmap_90.png")
    with zipfile.ZipFile(run_dir / "report.zip") as z:
        names = z.namelist()
        html = z.read("report/report.html").decode()
    assert any(n.endswith("/niah_heatmap_90.png") for n in names)
    caption = " ".join((run_dir / "report/niah_heatmap.rst").read_text().split()[:6])
    assert caption in html


def test_new_sparsity_reruns_only_scoring_and_figures(run_dir):
    cfg = yaml.safe_load((run_dir / "tiny.yaml").read_text())
    cfg["niah"]["sparsities"] = [0.9, 0.95]
    (run_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(run_dir, "-n", "figs/niah_heatmap_90.png"))
    # the cache job reruns with its new runs; xattention at 95% in the prefill regime
    assert jobs == {"niah_score": 2, "niah_table": 1, "niah_heatmap": 1}
