"""End-to-end Snakemake runs on tiny configs with the real models: the main job (needle
in a haystack) and the capture stage with Gemma-3-270M on a corpus of Python's help
topics, induction heads with both models, and perplexity, ablation and curvature figures
with SmolLM2-135M on the built-in corpus."""

import json

import numpy as np
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
        "regimes": {"cache": ["streamingllm", "snapkv", "quest"], "prefill": ["xattention"]},
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
    assert counts["len"].to_list() == [3] * 12  # full in both regimes, 3 + 1 policies
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
    for policy in ("snapkv", "quest", "xattention"):  # the peers ran, their sparsity measured
        peer = df.filter(pl.col("policy") == policy)
        assert peer.height == 6 and (peer["achieved_sparsity"] > 0.5).all()
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
    }
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
    for name, job in (("streamingllm", "niah_cache"), ("xattention", "niah_score")):
        module = run_dir / f"src/attnlab/policies/{name}.py"
        text = module.read_text()
        module.write_text(text + "# an edit\n")
        try:
            proc = snakemake(run_dir, "-n", "figs/niah_heatmap_90.png")
        finally:
            module.write_text(text)
        assert f"src/attnlab/policies/{name}.py" in proc.stdout
        assert planned_jobs(proc) == {job: 1, "niah_table": 1, "niah_heatmap": 1}


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
    assert jobs == {"niah_cache": 1, "niah_score": 1, "niah_table": 1, "niah_heatmap": 1}


INTERVENTION_FIGS = ["figs/intervention_gemma3-270m.png", "figs/gain_gemma3-270m.png"]
CAPTURE_FIGS = [
    f"figs/capture_gemma3-270m_{k}.png" for k in ("entropy", "qnorm_entropy", "keff", "sink")
]


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory, topics_jsonl):
    cfg = {
        "models": ["gemma3-270m"],
        "corpus": {"source": str(topics_jsonl), "chunk_len": 64, "max_chunks": 6, "shard_size": 2},
        "capture": {
            "chunks": 5,
            "batch_size": 2,
            "layers": [1, 5],
            "qk_chunks": 3,
            "bootstrap": 200,
        },
        "intervention": {"chunks": 2, "batch_size": 2, "scales": [0.5, 1.0, 1.5], "bootstrap": 200},
    }
    workdir = copy_workflow(tmp_path_factory.mktemp("capture"), cfg)
    kill_capture_after_one_shard(workdir)
    snakemake(workdir, "--cores", "2", *CAPTURE_FIGS, *INTERVENTION_FIGS)
    return workdir


def kill_capture_after_one_shard(workdir):
    """Start the capture under Snakemake and SIGKILL its job once the first shard is
    written, as a cluster would on a timeout; what is left is recorded in killed.json."""
    import os
    import signal
    import subprocess
    import time

    from workflow_helpers import snakemake_command

    target = "results/capture/gemma3-270m/metrics"
    cmd, env = snakemake_command(workdir, "--cores", "2", target)
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    work = workdir / "results/capture/gemma3-270m"
    deadline = time.monotonic() + 900
    while not list(work.glob(".capture-work-*/metrics/*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "capture never wrote a shard"
        time.sleep(0.1)
    jobs = [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and b"attnlab\x00capture" in _read(f"/proc/{pid}/cmdline")
        and os.path.realpath(f"/proc/{pid}/cwd") == os.path.realpath(workdir)
    ]
    assert len(jobs) == 1
    os.kill(jobs[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    left = {
        "snakemake_rc": proc.returncode,
        "metrics_exists": (workdir / target).exists(),
        "shards_done": len(list(work.glob(".capture-work-*/metrics/*.parquet"))),
        "planned": planned_jobs(snakemake(workdir, "-n", target)),
    }
    (workdir / "killed.json").write_text(json.dumps(left))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_capture_stage_from_corpus_to_figures(capture_dir):
    manifest = json.loads((capture_dir / "results/corpus/gemma3-270m/manifest.json").read_text())
    assert manifest["documents_dropped"] == {"RedPajamaGithub": 16}
    df = pl.read_parquet(capture_dir / "results/capture/gemma3-270m/metrics/*.parquet")
    assert df.height == 5 * 18 * 4 * 64  # chunks x layers x heads x tokens
    assert df["sample"].n_unique() == 5 and df["kv_head"].unique().to_list() == [0]
    assert df.filter(pl.col("token") < 2)["entropy"].is_nan().all()
    assert df.filter(pl.col("token") >= 2)["entropy"].is_nan().sum() == 0
    assert ((df["k_eff"] >= 1) & (df["k_eff"] <= df["token"] + 1)).all()
    from attnlab import capture

    k = capture.read_qk(capture_dir / "results/capture/gemma3-270m/qk", 5, "k", "pre")
    assert k.shape == (3, 1, 64, 256) and k.dtype.name == "float16"
    for fig in CAPTURE_FIGS:
        assert (capture_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (capture_dir / "logs/capture/gemma3-270m.log").read_text()
    assert "tok/s" in log


def test_a_killed_capture_job_leaves_no_output_and_the_rerun_resumes(capture_dir):
    left = json.loads((capture_dir / "killed.json").read_text())
    assert left["snakemake_rc"] != 0 and not left["metrics_exists"]
    assert left["shards_done"] >= 1 and left["planned"] == {"capture": 1}
    log = (capture_dir / "logs/capture/gemma3-270m.log").read_text()
    assert f"'resumed_chunks': {2 * left['shards_done']}" in log  # 2 chunks per shard
    assert not list((capture_dir / "results/capture/gemma3-270m").glob(".capture-work-*"))


def test_new_capture_layers_rerun_capture_but_not_sharding(capture_dir):
    cfg = yaml.safe_load((capture_dir / "tiny.yaml").read_text())
    cfg["capture"]["layers"] = [1]
    (capture_dir / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(capture_dir, "-n", *CAPTURE_FIGS))
    assert jobs == {"capture": 1, "capture_figure": 4}


def test_intervention_on_auto_heads_from_the_capture(capture_dir):
    base = capture_dir / "results/intervention/gemma3-270m"
    heads = json.loads((base / "heads.json").read_text())
    assert heads["target"]["head"] != heads["control"]["head"]
    assert abs(heads["target"]["r"]) >= abs(heads["control"]["r"])
    from attnlab import tables

    target = base / f"{heads['target']['head']}.parquet"
    checks = tables.meta(target)["checks"]
    assert checks["scale_one_max_logit_diff"] == 0.0 and checks["isolation"]["ok"]
    df = pl.read_parquet(target)
    assert sorted(df["scale"].unique().to_list()) == [0.5, 1.0, 1.5]
    assert df.height == 3 * 2 * 64
    g = pl.read_parquet(base / "gain.parquet")
    assert g.height == 6 and set(g["role"]) == {"target", "control"}
    assert g["verdict"].str.contains("expected|no monotone trend").all()
    for fig in INTERVENTION_FIGS:
        assert (capture_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (capture_dir / f"logs/intervention/gemma3-270m_{heads['target']['head']}.log").read_text()
    assert "expected as the scale grows: entropy decreasing" in log


INDUCTION_FIGS = ["figs/induction_cross_model.png", "figs/induction_causal.png"]


@pytest.fixture(scope="module")
def induction_dir(tmp_path_factory):
    cfg = {
        "models": ["gemma3-270m", "smollm2-135m"],
        "induction": {
            "lags": [4, 8],
            "seq_len": 48,
            "per_lag": 2,
            "bootstrap": 200,
            "permutations": 200,
            "causal": {"k": 3, "draws": 2, "prompts": 4},
        },
    }
    workdir = copy_workflow(tmp_path_factory.mktemp("induction"), cfg)
    snakemake(workdir, "--cores", "2", *INDUCTION_FIGS)
    return workdir


def test_induction_heads_across_both_registry_models(induction_dir):
    for model, layers in (("gemma3-270m", 18), ("smollm2-135m", 30)):
        base = induction_dir / "results/induction" / model
        scores = pl.read_parquet(base / "scores.parquet")
        assert scores["layer"].n_unique() == layers
        profile = json.loads((base / "profile.json").read_text())
        assert profile["n_layers"] == layers and len(profile["profile"]) == layers
        lo, hi = profile["peak_depth_ci"]
        assert 0 <= lo <= profile["peak_depth"] <= hi < 1
        assert set(profile["lags"]) == {"short"}  # lags 4 and 8 are both short
        assert scores["prev_score"].is_between(0, 1).all()  # stored beside each score
        assert set(profile["by_lag"]) == {"4", "8"}
        nulls = json.loads((base / "nulls.json").read_text())
        peak = int(round(profile["peak_depth"] * layers))
        assert profile["profile"][peak] > nulls["shuffled_antecedent"]["hi"][peak]
        causal = json.loads((base / "causal.json").read_text())
        assert len(causal["top_heads"]) == 3 and causal["delta_topk"] < causal["delta_random"]
    for fig in INDUCTION_FIGS:
        assert (induction_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PARETO_FIGS = [f"figs/{k}_smollm2-135m.png" for k in ("pareto", "ablation", "frc_vs_magnitude")]


@pytest.fixture(scope="module")
def pareto_dir(tmp_path_factory):
    """The perplexity, ablation and curvature figures from the built-in corpus, with the
    needle hidden in corpus text."""
    cfg = {
        "models": ["smollm2-135m"],
        "corpus": {"chunk_len": 96, "max_chunks": 24, "shard_size": 8},
        "niah": {"lengths": [256], "depths": [0.5], "haystack": "corpus"},
        "pareto": {"policies": ["cab"], "sparsities": [0.75], "chunks": 3, "repeats": 2},
        # CAB and a named variant: the variant machinery (lambda variants are named the
        # same way, tests/test_workflow.py); baselines are ordinary policies
        "ablation": {
            "baselines": [],
            "lams": [1.0],
            "variants": ["cab_plan"],
            "sparsities": [0.75],
        },
        "frc": {"layer": 3, "length": 256, "depth": 0.5},
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
    assert prompts["haystack"].to_list() == ["corpus"]
    assert "The grass is green" not in _decode_smollm2(prompts["input_ids"][0].to_list())


def test_frc_table_marks_the_needle_blocks(pareto_dir):
    df = pl.read_parquet(pareto_dir / "results/frc/smollm2-135m.parquet")
    assert df["head"].n_unique() == 9 and df["needle"].any()
    for fig in PARETO_FIGS:
        assert (pareto_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _decode_smollm2(ids):
    from transformers import AutoTokenizer

    from attnlab import models

    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m")).decode(ids)
