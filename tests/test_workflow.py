"""Workflow plumbing: names, code dependencies, and config validation by the real Snakemake."""

import shutil

import pytest

from attnlab.errors import UserError
from attnlab.sources import module_sources
from attnlab.workflow import cache_shards, model_key, niah_part, pct, sparsity
from workflow_helpers import copy_workflow, planned_jobs, snakemake


def test_sparsity_file_names_round_trip():
    for s in (0.9, 0.95, 0.99, 0.995):
        assert sparsity(pct(s)) == s
    assert pct(0.99) == "99" and model_key("EleutherAI/pythia-410m") == "EleutherAI--pythia-410m"


def test_niah_part_names_read_back_as_their_run_and_shard():
    """The parts the workflow names (the cache regime's shards, a prefill run's
    ``<policy>_<pct>``) read back as what made them; anything else is refused."""
    assert [niah_part(f"all{s}") for s in cache_shards(1)] == [(None, "1of1")]
    assert [niah_part(f"all{s}")[1] for s in cache_shards(3)] == ["1of3", "2of3", "3of3"]
    for policy in ("quest", "quest_global", "cab_sparq"):
        assert niah_part(f"{policy}_{pct(0.995)}") == ((policy, 0.995), "1of1")
    for bad in ("Quest_99", "quest", "all_1of2x", "quest_99_"):
        with pytest.raises(UserError, match="a NIAH part is"):
            niah_part(bad)
    for bad in ("all_0of3", "all_4of3"):
        with pytest.raises(UserError, match="1 <= i <= n"):
            niah_part(bad)


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
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "config error" in ln)
    assert "'magic' is neither a policy" in line and "streamingllm, topk" in line


def test_a_variant_is_its_base_with_its_own_settings_on_top_and_the_defaults_filled():
    from attnlab.workflow import policy_module, policy_spec

    policies = {"cab": {"block_size": 16, "lam": 1.0, "graph": "symmetric"}}
    policies["cab_b64"] = {"base": "cab", "block_size": 64}
    cab = {  # the dataclass's fields, its defaults where the config says nothing
        "block_size": 16,
        "keep_diagonal": True,
        "sink_block": True,
        "lam": 1.0,
        "adjacency": "softmax",
        "graph": "symmetric",
        "query": "block",
        "selection": "paper",
        "candidates": 0.0,
        "magnitude": "coarse",
        "top_p": 0.0,
    }
    assert policy_spec("cab", policies) == cab
    assert policy_spec("cab_b64", policies) == {**cab, "block_size": 64, "base": "cab"}
    assert policy_spec("cab_lam30", policies) == {**cab, "lam": 0.3, "base": "cab"}
    assert policy_module("cab_b64", policies) == policy_module("cab_lam30", policies) == "cab"
    assert policy_spec("h2o", policies) == {"recent_ratio": 0.5}
    assert policy_module("kvpress:KnormPress", policies) == "kvpress_press"


def test_a_variant_must_be_configured_and_its_settings_are_its_base_fields(tmp_path):
    for name, cfg, expected in (
        (
            "undefined",
            {"ablation": {"variants": ["cab_plan", "cab_wide"]}},
            "'cab_wide' is neither",
        ),
        ("field", {"policies": {"cab_x": {"base": "cab", "lamda": 0.5}}}, "no parameter 'lamda'"),
        ("choice", {"policies": {"cab": {"graph": "dense"}}}, "graph must be one of"),
        ("bound", {"policies": {"h2o": {"recent_ratio": 1.5}}}, "recent_ratio must be <= 1"),
        ("block", {"policies": {"h2o": {"block_size": 16}}}, "'h2o' has no parameter 'block_size'"),
        ("typo", {"policies": {"h2oo": {}}}, "policies.h2oo: unknown policy 'h2oo'"),
    ):
        copy_workflow(tmp_path / name, cfg)
        proc = snakemake(tmp_path / name, "-n", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
        assert len(lines) == 1 and expected in lines[0], (name, proc.stderr)


def test_default_config_plans_the_main_job(tmp_path):
    copy_workflow(tmp_path)
    proc = snakemake(tmp_path, "-n", "figs/niah_heatmap_99.png")
    jobs = planned_jobs(proc)
    # per model: one cache-regime job (full + 4 policies x 3 sparsities, one prefill per
    # prompt, full attention's prefill-regime rows with it) and prefill-regime jobs for
    # the top-k oracle and CAB at 3 sparsities
    assert jobs["niah_score"] == 2 + 2 * 2 * 3
    assert "results/niah/cache/smollm2-135m/all.parquet" in proc.stdout
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
    assert jobs["niah_length"] == 2  # the committed GPU studies' (long context, oracle gap)
    assert jobs["niah_latency"] == 1  # the long-context study's (its table records the
    # selection each row timed)
    assert jobs["long_context_matched"] == 1  # its accuracy-matched table and figure
    assert jobs["niah_recall"] == 3  # the pipeline's and the two GPU studies'
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
    assert rules - {"all", "niah_study"} == sized


def test_the_gpu_profile_puts_each_model_job_on_the_card_within_its_memory(tmp_path):
    """The long-context study under profiles/gpu: every model job takes the card (gpu=1)
    and claims GPU memory from its kind, block policies more than token ones, none more
    than the card offers; the prefill benchmark claims all of it, so it times alone."""
    import re

    import yaml

    from workflow_helpers import REPO

    cap = yaml.safe_load((REPO / "profiles/gpu/config.yaml").read_text())["resources"]
    copy_workflow(tmp_path)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    proc = snakemake(
        tmp_path,
        "-n",
        "-p",
        "--profile",
        "profiles/gpu",
        "--configfile=configs/long_context.yaml",
        "niah_study",
    )
    # the prefill benchmark times every prefill-regime policy, token-level ones in the row
    # chunks their NIAH jobs take
    bench = next(ln for ln in proc.stdout.splitlines() if "attnlab bench prefill" in ln)
    policies = bench.split("--policies ")[1].split(" --")[0].split()
    assert policies[:2] == ["full", "cab"] and policies[-4:] == [
        "topk", "h2o", "streamingllm", "snapkv"
    ]  # fmt: skip
    assert "--row-chunk 1024" in bench
    claims = {}
    for rule, wildcards, res in re.findall(
        r"^(?:local)?rule (\w+):.*?(?:wildcards: ([^\n]*)\n.*?)?resources: ([^\n]*)",
        proc.stdout,
        re.M | re.S,
    ):
        fields = dict(kv.split("=", 1) for kv in res.split(", "))
        claims.setdefault(rule, []).append((wildcards, fields))
    for rule in ("niah_score", "bench_prefill", "bench_generate"):
        for _, fields in claims[rule]:
            assert fields["gpu"] == "1" and 0 < int(fields["gpu_mem_gb"]) <= cap["gpu_mem_gb"]
    for rule in ("bench_prefill", "bench_generate"):  # a benchmark times alone
        assert int(claims[rule][0][1]["gpu_mem_gb"]) == cap["gpu_mem_gb"]
    score = {w: int(f["gpu_mem_gb"]) for w, f in claims["niah_score"]}
    cab = next(v for w, v in score.items() if "part=cab_" in w)
    snapkv = next(v for w, v in score.items() if "part=snapkv_" in w)
    assert snapkv > cab  # measured: SnapKV's row chunks, a row per query block for CAB


def test_ablation_plans_each_variant_once_and_shares_runs_with_the_other_stages(tmp_path):
    copy_workflow(tmp_path)
    proc = snakemake(tmp_path, "-n", "figs/ablation_smollm2-135m.png", "figs/niah_heatmap_90.png")
    jobs = planned_jobs(proc)
    # NIAH in the prefill regime: top-k and CAB x 3 sparsities for the heatmaps, + the
    # oracle, coarse magnitude, random blocks, CAB at lambda 0.3, 0.5, 0.7 at 75% (lambda
    # 1.0 is cab) and CAB's four named variants, + cab_75; full attention runs once per
    # model and grid, in the cache jobs
    # + the cache regime's: one per model, and the ablation's variants
    assert jobs["niah_score"] == 2 * 2 * 3 + 6 + 4 + 1 + 2 + 1
    assert jobs["pareto_score"] == 2 * (1 + 11)  # both regimes: full + the eleven runs
    assert "results/niah/prefill/smollm2-135m/cab_lam30_75.parquet" in proc.stdout
    assert "results/niah/prefill/smollm2-135m/cab_query_75.parquet" in proc.stdout
    assert "results/ablation/cache/smollm2-135m/all.parquet" in proc.stdout
    for regime in ("prefill", "cache"):
        assert f"results/pareto/{regime}/smollm2-135m/cab_75.parquet" in proc.stdout
    assert "results/niah/prefill/smollm2-135m/full_0.parquet" not in proc.stdout
    assert "cab_lam100" not in proc.stdout and '"policy_params": {"adjacency"' in proc.stdout


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


def test_gpu_memory_claims_follow_the_measured_kinds():
    """SnapKV (and a variant of it) claims its own measured peak, above the other token
    policies', above a block policy's; the cache-regime job claims the dense allowance;
    claims shrink with the prompt length."""
    from attnlab import workflow

    policies = {"snap_w64": {"base": "snapkv", "window": 64}}
    kinds = {p: workflow.gpu_job_kind(p, policies) for p in ("snapkv", "snap_w64", "topk", "cab")}
    assert kinds == {"snapkv": "snapkv", "snap_w64": "snapkv", "topk": "token", "cab": "block"}
    assert workflow.gpu_job_kind(None, policies) == "dense"
    claim = {k: workflow.gpu_mem_gb(k, 32768) for k in ("snapkv", "token", "block", "dense")}
    assert claim["snapkv"] > claim["token"] > claim["dense"] > claim["block"]
    assert workflow.gpu_mem_gb("token", 8192) < claim["token"]
