"""What reruns, and what a rerun writes: two runs of one config write the same bytes, and
an edit to one stage's code reruns that stage alone (the real Snakemake on copies of the
workflow and the package)."""

import os
import time

from workflow_helpers import copy_workflow, planned_jobs, snakemake


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
    }
    targets = [
        "results/corpus/smollm2-135m/manifest.json",
        "results/niah/smollm2-135m/prompts.parquet",
        "results/niah/prefill/smollm2-135m/streamingllm_90.parquet",
        "results/niah/cache/smollm2-135m/all.parquet",
        "results/induction/smollm2-135m/profile.json",
    ]  # not perplexity: its table holds wall times, its passes are the model's as NIAH's are
    runs = []
    for name in ("a", "b"):
        copy_workflow(tmp_path / name, cfg)
        snakemake(tmp_path / name, "--cores", "2", *targets)
        files = sorted((tmp_path / name / "results").rglob("*.*"))
        runs.append({str(f.relative_to(tmp_path / name)): f for f in files})
    assert runs[0].keys() == runs[1].keys()
    assert "results/induction/smollm2-135m/scores.parquet" in runs[0]
    assert any("shards" in f for f in runs[0])
    for f in runs[0]:
        assert runs[0][f].read_bytes() == runs[1][f].read_bytes(), f


def _rule_code(proc, rule: str) -> set[str]:
    """The package modules (paths inside attnlab/) a dry run lists as a rule's inputs."""
    lines = proc.stdout.splitlines()
    at = lines.index(f"rule {rule}:")
    inputs = next(ln for ln in lines[at:] if ln.strip().startswith("input:"))
    paths = inputs.split(":", 1)[1].split(",")
    return {p.strip().split("attnlab/", 1)[1] for p in paths if "attnlab/" in p}


def test_kernel_benchmark_code_is_the_kernels_not_the_models(tmp_path):
    copy_workflow(tmp_path)
    proc = snakemake(tmp_path, "-n", "--forceall", "figs/bench_kernels.png")
    code = _rule_code(proc, "bench_kernels")
    assert {"bench/kernels.py", "bench/timing.py", "flex.py", "plots/kernels.py"} <= code
    assert not code & {"capture.py", "corpus.py", "models.py", "bench/capture.py", "sparse.py"}


def test_editing_the_capture_stage_reruns_the_capture_benchmark_alone(tmp_path):

    copy_workflow(tmp_path, source=True)
    outputs = ["results/bench/kernels.parquet", "results/bench/kernels.csv"]
    outputs += ["figs/bench_kernels.png", "results/bench/capture.parquet"]
    outputs += ["results/bench/capture.csv", "figs/bench_capture.png"]
    for name in outputs:  # outputs newer than their code: nothing to do
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    targets = ["-n", "figs/bench_kernels.png", "figs/bench_capture.png", "--rerun-triggers=mtime"]
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
EVERY_TARGET = ["all", "figs/bench_kernels.png", "figs/bench_capture.png"] + [
    f"figs/{name}.png"
    for name in (
        "capture_smollm2-135m_entropy",
        "gain_smollm2-135m",
        "intervention_smollm2-135m",
        "pareto_smollm2-135m",
        "ablation_smollm2-135m",
        "curvature_smollm2-135m",
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
    "niah_jobs.py": {"niah_prompts", "niah_score", "niah_table"},
    "niah_paired.py": {"niah_paired"},
    "pareto.py": {"pareto_score", "pareto_table", "ablation_table"},
    "curvature.py": {"curvature"},
    # a figure reads its table alone: the stage's figures list its plot module, not its verb
    "intervention.py": {"intervention_heads", "intervention_sweep", "gain"},
    "plots/intervention.py": {"intervention_figure", "gain_figure"},
    "gain.py": {"gain"},
    "induction.py": {"induction_scores", "induction_analysis", "induction_causal"},
    "plots/induction.py": {"induction_model_figure", "induction_cross_figure"},
    "robustness.py": {"induction_analysis"},
    "causal.py": {"induction_causal"},
    "capture.py": {"capture", "curvature", "bench_capture"},
    "plots/capture.py": {"capture_figure"},
    "plots/pareto.py": {"pareto_figure"},
    "plots/curvature.py": {"curvature_figure"},
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
        # the cache regime's of the NIAH grid and the ablation; in the prefill regime CAB
        # at 90% in the grid, the top-k oracle and CAB at 75%
        "niah_score": 2 + 3,
        "niah_table": 1,
        "niah_paired": 1,  # the pipeline's table, not the committed long-context one
        "niah_heatmap": 1,
        "niah_summary": 1,
        "niah_recall": 1,
        "niah_tasks": 1,
        "curvature": 1,
        "curvature_figure": 1,
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
