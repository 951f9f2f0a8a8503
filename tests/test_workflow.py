"""Workflow plumbing: names, code dependencies, and config validation by the real Snakemake."""

import os
import time

import polars as pl

from attnlab.workflow import model_key, module_sources, pct, sparsity
from workflow_helpers import copy_workflow, planned_jobs, snakemake


def test_sparsity_file_names_round_trip():
    for s in (0.9, 0.95, 0.99, 0.995):
        assert sparsity(pct(s)) == s
    assert pct(0.99) == "99" and model_key("EleutherAI/pythia-410m") == "EleutherAI--pythia-410m"


def test_module_sources_follow_imports_transitively():
    cab = module_sources("policies.cab")
    assert any(p.endswith("kernels/reference.py") for p in cab)
    assert not any(p.endswith("policies/h2o.py") for p in cab)
    assert any(p.endswith("policies/cab.py") for p in module_sources("policies.coarse_magnitude"))


def test_bad_config_value_stops_with_one_line(tmp_path):
    copy_workflow(tmp_path, {"niah": {"sparsities": [0.9, 1.5]}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
    assert len(lines) == 1 and "niah.sparsities.1" in lines[0] and "1.5" in lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_policy_in_config_names_the_allowed_values(tmp_path):
    copy_workflow(tmp_path, {"niah": {"regimes": {"cache": ["cab", "magic"]}}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "'magic' does not match" in proc.stderr
    assert "streamingllm|cab" in proc.stderr  # the allowed names


def test_a_variant_is_its_base_with_its_own_settings_on_top():
    from attnlab.workflow import policy_module, policy_spec

    policies = {"cab": {"block_size": 16, "lam": 1.0, "graph": "symmetric"}}
    policies["cab_b64"] = {"base": "cab", "block_size": 64}
    assert policy_spec("cab_b64", policies) == {
        "base": "cab",
        "block_size": 64,
        "lam": 1.0,
        "graph": "symmetric",
    }
    assert policy_spec("cab_lam30", policies) == {**policies["cab"], "lam": 0.3, "base": "cab"}
    assert policy_module("cab_b64", policies) == policy_module("cab_lam30", policies) == "cab"
    assert policy_spec("h2o", policies) == {}


def test_a_cab_variant_must_be_configured(tmp_path):
    copy_workflow(tmp_path, {"ablation": {"variants": ["cab_plan", "cab_wide"]}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "config error: policies has no entry for cab_wide" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_config_plans_the_main_job(tmp_path):
    copy_workflow(tmp_path)
    jobs = planned_jobs(snakemake(tmp_path, "-n", "figs/niah_heatmap_99.png"))
    # per model: one cache-regime job (full + 4 policies x 3 sparsities, one prefill per
    # prompt, full attention's prefill-regime rows with it) and prefill-regime jobs for
    # the top-k oracle and CAB at 3 sparsities
    assert jobs["niah_cache"] == 2 and jobs["niah_score"] == 2 * 2 * 3
    assert jobs["niah_prompts"] == 2 and jobs["niah_heatmap"] == 1


def test_intervention_needs_the_capture_only_for_auto_heads(tmp_path, topics_jsonl):
    corpus = {"source": str(topics_jsonl)}
    fig = "figs/gain_smollm2-135m.png"
    copy_workflow(tmp_path / "auto", {"models": ["smollm2-135m"], "corpus": corpus})
    auto = planned_jobs(snakemake(tmp_path / "auto", "-n", fig))
    assert auto["capture"] == 1 and auto["intervention_heads"] == 1
    explicit = {"target": "L3H0", "control": "L20H4"}
    cfg = {"models": ["smollm2-135m"], "corpus": corpus, "intervention": explicit}
    copy_workflow(tmp_path / "explicit", cfg)
    jobs = planned_jobs(snakemake(tmp_path / "explicit", "-n", fig))
    assert "capture" not in jobs and jobs["intervention_heads"] == 1


def test_a_malformed_head_in_the_config_stops_with_one_line(tmp_path):
    copy_workflow(tmp_path, {"intervention": {"target": "layer3"}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "config error at intervention.target" in proc.stderr and "Traceback" not in proc.stderr


def test_rule_all_plans_induction_for_every_model_and_refuses_lag_one(tmp_path):
    copy_workflow(tmp_path / "default")
    jobs = planned_jobs(snakemake(tmp_path / "default", "-n"))
    assert jobs["induction_scores"] == 2 and jobs["induction_causal"] == 2
    assert jobs["induction_cross_figure"] == 3 and jobs["induction_model_figure"] == 6
    assert jobs["niah_paired"] == 2  # the pipeline's NIAH table and the long-context one
    assert jobs["long_context_latency"] == jobs["long_context_recall"] == 1  # committed GPU tables
    copy_workflow(tmp_path / "lag1", {"induction": {"lags": [1, 4]}})
    proc = snakemake(tmp_path / "lag1", "-n", check=False)
    assert proc.returncode != 0
    assert "config error at induction.lags.0" in proc.stderr and "Traceback" not in proc.stderr


def test_the_slurm_profile_sizes_every_rule():
    """A rule missing from set-resources would run on the cluster's defaults (30 min)."""
    import re

    import yaml

    from workflow_helpers import REPO

    rules = set()
    for f in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", f.read_text(), re.M))
    sized = set(yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())["set-resources"])
    assert rules - {"all"} == sized


def test_two_runs_of_one_config_write_byte_identical_tables(tmp_path, topics_jsonl):
    cfg = {
        "models": ["smollm2-135m"],
        "corpus": {"source": str(topics_jsonl), "chunk_len": 64, "max_chunks": 4},
        "niah": {
            "lengths": [512],
            "depths": [0.0, 1.0],
            "sparsities": [0.9],
            "regimes": {"cache": ["snapkv"], "prefill": ["streamingllm"]},
        },
        "induction": {"lags": [4], "seq_len": 24, "per_lag": 2, "bootstrap": 100},
        "pareto": {"policies": [], "chunks": 2, "repeats": 1, "regimes": ["cache"]},
    }
    targets = [
        "results/corpus/smollm2-135m/manifest.json",
        "results/niah/smollm2-135m/prompts.parquet",
        "results/niah/prefill/smollm2-135m/streamingllm_90.parquet",
        "results/niah/smollm2-135m/cache.parquet",
        "results/induction/smollm2-135m/profile.json",
        "results/pareto/smollm2-135m.parquet",
    ]
    runs = []
    for name in ("a", "b"):
        copy_workflow(tmp_path / name, cfg)
        snakemake(tmp_path / name, "--cores", "2", *targets)
        files = sorted((tmp_path / name / "results").rglob("*.*"))
        runs.append({str(f.relative_to(tmp_path / name)): f for f in files})
    assert runs[0].keys() == runs[1].keys()
    assert "results/induction/smollm2-135m/scores.parquet" in runs[0]
    assert any("shards" in f for f in runs[0])
    timed = {"seconds_per_token", "ms_per_token"}  # wall times: the one thing that may differ
    for f in runs[0]:
        if "/pareto/" in f:
            a, b = (pl.read_parquet(r[f]) for r in runs)
            assert timed & set(a.columns)
            assert a.drop(timed, strict=False).equals(b.drop(timed, strict=False)), f
        else:
            assert runs[0][f].read_bytes() == runs[1][f].read_bytes(), f


def test_ablation_plans_each_variant_once_and_shares_runs_with_the_other_stages(tmp_path):
    copy_workflow(tmp_path)
    proc = snakemake(tmp_path, "-n", "figs/ablation_smollm2-135m.png", "figs/niah_heatmap_90.png")
    jobs = planned_jobs(proc)
    # NIAH in the prefill regime: top-k and CAB x 3 sparsities for the heatmaps, + the
    # oracle, coarse magnitude, random blocks, CAB at lambda 0.3, 0.5, 0.7 at 75% (lambda
    # 1.0 is cab) and CAB's four named variants, + cab_75; full attention runs once per
    # model and grid, in the cache jobs
    assert jobs["niah_score"] == 2 * 2 * 3 + 6 + 4 + 1
    assert jobs["niah_cache"] == 2 + 1  # one per model, and the ablation's variants
    assert jobs["pareto_score"] == 2 * (1 + 11)  # both regimes: full + the eleven runs
    assert "results/niah/prefill/smollm2-135m/cab_lam30_75.parquet" in proc.stdout
    assert "results/niah/prefill/smollm2-135m/cab_query_75.parquet" in proc.stdout
    assert "results/ablation/smollm2-135m/cache.parquet" in proc.stdout
    for regime in ("prefill", "cache"):
        assert f"results/pareto/{regime}/smollm2-135m/cab_75.parquet" in proc.stdout
    assert "results/niah/prefill/smollm2-135m/full_0.parquet" not in proc.stdout
    assert "cab_lam100" not in proc.stdout and '--policy-params \'{"adjacency"' in proc.stdout


def test_wrong_type_and_zero_sparsity_stop_with_one_line(tmp_path):
    for name, cfg, key in (
        ("type", {"niah": {"samples": "three"}}, "niah.samples"),
        ("zero", {"niah": {"sparsities": [0.0]}}, "niah.sparsities.0"),
        ("threads", {"threads": 0}, "threads"),
    ):
        copy_workflow(tmp_path / name, cfg)
        proc = snakemake(tmp_path / name, "-n", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
        assert len(lines) == 1 and f"config error at {key}:" in lines[0], proc.stderr


def _rule_code(proc, rule: str) -> set[str]:
    """The package modules (paths inside attnlab/) a dry run lists as a rule's inputs."""
    lines = proc.stdout.splitlines()
    at = lines.index(f"rule {rule}:")
    inputs = next(ln for ln in lines[at:] if ln.strip().startswith("input:"))
    paths = inputs.split(":", 1)[1].split(",")
    return {p.strip().split("attnlab/", 1)[1] for p in paths if "attnlab/" in p}


def test_kernel_benchmark_code_is_the_kernels_not_the_models(tmp_path):
    copy_workflow(tmp_path)
    proc = snakemake(tmp_path, "-n", "--forceall", "figs/kernel_speed.png")
    code = _rule_code(proc, "bench_kernels")
    assert {"bench/kernels.py", "bench/timing.py", "flex.py", "plots/kernels.py"} <= code
    assert not code & {"capture.py", "corpus.py", "models.py", "bench/capture.py", "sparse.py"}


def test_editing_the_capture_stage_reruns_the_capture_benchmark_alone(tmp_path):

    copy_workflow(tmp_path, source=True)
    outputs = ["results/bench/kernels.parquet", "results/bench/kernels.csv"]
    outputs += ["figs/kernel_speed.png", "results/bench/capture.parquet"]
    outputs += ["results/bench/capture.csv", "figs/bench_capture.png"]
    for name in outputs:  # outputs newer than their code: nothing to do
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    targets = ["-n", "figs/kernel_speed.png", "figs/bench_capture.png", "--rerun-triggers=mtime"]
    assert planned_jobs(snakemake(tmp_path, *targets)) == {}
    later = (tmp_path / outputs[0]).stat().st_mtime + 10
    os.utime(tmp_path / "src/attnlab/capture.py", (later, later))
    assert planned_jobs(snakemake(tmp_path, *targets)) == {"bench_capture": 1}
    os.utime(tmp_path / "src/attnlab/bench/timing.py", (later, later))
    assert planned_jobs(snakemake(tmp_path, *targets)) == {"bench_capture": 1, "bench_kernels": 1}


# Every stage of the pipeline, with the heads given (so the sweeps are known before the
# checkpoint reruns) and one policy per regime.
EVERY_STAGE = {
    "models": ["smollm2-135m"],
    "niah": {"sparsities": [0.9], "regimes": {"cache": ["streamingllm"], "prefill": ["cab"]}},
    "intervention": {"target": "L0H0", "control": "L0H1"},
    "pareto": {"policies": ["cab"], "sparsities": [0.9]},
    "ablation": {"lams": [1.0], "variants": [], "baselines": ["topk"]},
}
EVERY_TARGET = ["all", "figs/kernel_speed.png", "figs/bench_capture.png"] + [
    f"figs/{name}.png"
    for name in (
        "capture_smollm2-135m_entropy",
        "gain_smollm2-135m",
        "intervention_smollm2-135m",
        "pareto_smollm2-135m",
        "ablation_smollm2-135m",
        "frc_vs_magnitude_smollm2-135m",
    )
]


def _outputs(proc) -> list[str]:
    """Every output a dry run plans."""
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    return [
        p.strip()
        for ln in lines
        if ln.startswith("output:")
        for p in ln.removeprefix("output:").split(",")
    ]


def _built(workdir):
    """A copy of the workflow and the package in ``workdir`` whose every output (empty, a
    folder where the name has no suffix) is newer than its code; returns the dry run that
    planned them from nothing."""
    import json
    import time

    copy_workflow(workdir, EVERY_STAGE, source=True)
    heads = workdir / "results/intervention/smollm2-135m/heads.json"
    heads.parent.mkdir(parents=True)
    heads.write_text(json.dumps({"target": {"head": "L0H0"}, "control": {"head": "L0H1"}}))
    proc = snakemake(workdir, "-n", "--rerun-triggers=mtime", *EVERY_TARGET)
    now = time.time()
    for name in [*_outputs(proc), str(heads.relative_to(workdir))]:
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if not path.suffix else path.touch()
        os.utime(path, (now, now))
    return proc


def _edited(workdir, module: str):
    """The dry run once ``module`` (a path inside the package) is newer than every output;
    the module's time is set back after."""
    path = workdir / "src/attnlab" / module
    before = path.stat().st_mtime
    later = time.time() + 10
    os.utime(path, (later, later))
    try:
        proc = snakemake(workdir, "-n", "--rerun-triggers=mtime", *EVERY_TARGET)
    finally:
        os.utime(path, (before, before))
    return proc


def _code_by_rule(*procs) -> dict[str, set[str]]:
    """Rule -> the package modules (paths inside attnlab/) its jobs list as inputs, over
    every job of the dry runs ``procs``."""
    code: dict[str, set[str]] = {}
    for proc in procs:
        rule = None
        for line in proc.stdout.splitlines():
            if line.startswith(("rule ", "checkpoint ", "localrule ")):
                rule = line.split()[1].rstrip(":")
            elif rule and line.strip().startswith("input:"):
                paths = line.split(":", 1)[1].split(",")
                mods = {p.strip().split("attnlab/", 1)[1] for p in paths if "attnlab/" in p}
                code.setdefault(rule, set()).update(mods)
    return code


def _rules_listing(code: dict[str, set[str]], module: str) -> set[str]:
    """The rules whose code inputs hold ``module``."""
    return {rule for rule, mods in code.items() if module in mods}


# The rules whose code lists each stage's verb module, directly or through an import (a
# stage module imported by another stage's reruns that one too, as its tables feed it).
VERB_RULES = {
    "niah_jobs.py": {"niah_prompts", "niah_cache", "niah_score", "niah_table"},
    "niah_paired.py": {"niah_paired"},
    "pareto.py": {"pareto_score", "pareto_table", "ablation_table"},
    "curvature.py": {"frc_table"},
    "intervention.py": {
        "intervention_heads",
        "intervention_sweep",
        "gain",
        "intervention_figure",
        "gain_figure",
    },
    "gain.py": {"gain"},
    "induction.py": {
        "induction_scores",
        "induction_analysis",
        "induction_causal",
        "induction_model_figure",
        "induction_cross_figure",
    },
    "robustness.py": {"induction_analysis"},
    "causal.py": {"induction_causal"},
    "capture.py": {"capture", "frc_table", "bench_capture"},
    "plots/capture.py": {"capture_figure"},
    "plots/pareto.py": {"pareto_figure", "frc_figure"},
}


def test_editing_one_stage_reruns_that_stage_and_the_command_line_reruns_every_stage(tmp_path):
    """Every output of a config with every stage is built (empty files, newer than the
    code), then one module at a time is made newer and a dry run plans what reruns, by
    rule: the command line reruns every job; the NIAH verbs rerun the NIAH jobs and what
    reads their tables (the curvature table reads the prompts, the ablation table the
    scores), never the induction, intervention, capture or corpus jobs; the induction
    verbs rerun only the induction jobs. For every stage, the rules whose code lists its
    verb module (the two dry runs' inputs) are the stage's own."""
    full = _built(tmp_path)
    every = planned_jobs(full)
    cli = _edited(tmp_path, "cli.py")
    # The checkpoint reruns too, and the sweeps are planned once it has resolved the heads.
    assert planned_jobs(cli) == {
        **{r: n for r, n in every.items() if r != "intervention_sweep"},
        "intervention_heads": 1,
    }
    assert planned_jobs(_edited(tmp_path, "niah_jobs.py")) == {
        "niah_prompts": 1,
        "niah_cache": 2,  # the NIAH grid's and the ablation's
        "niah_score": 3,  # CAB at 90% in the grid; the top-k oracle and CAB at 75%
        "niah_table": 1,
        "niah_paired": 1,  # the pipeline's table, not the committed long-context one
        "niah_heatmap": 1,
        "niah_summary": 1,
        "niah_recall": 1,
        "niah_tasks": 1,
        "frc_table": 1,
        "frc_figure": 1,
        "ablation_table": 1,
        "pareto_figure": 1,  # the ablation's, not the perplexity one
        "all": 1,
    }
    assert planned_jobs(_edited(tmp_path, "induction.py")) == {
        "induction_scores": 1,
        "induction_analysis": 1,
        "induction_causal": 1,
        "induction_model_figure": 3,
        "induction_cross_figure": 3,
        "all": 1,
    }
    code = _code_by_rule(full, cli)
    assert _rules_listing(code, "cli.py") == set(code) - {"all"}
    for module, rules in VERB_RULES.items():
        assert _rules_listing(code, module) == rules, module
