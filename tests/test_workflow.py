"""Workflow plumbing: names, code dependencies, and config validation by the real Snakemake."""

from attnlab.workflow import model_key, module_sources, pct, sparsity
from workflow_helpers import copy_workflow, snakemake


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
    copy_workflow(tmp_path, {"niah": {"policies": ["cab", "magic"]}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "'magic' is not one of" in proc.stderr


def test_default_config_plans_the_main_job(tmp_path):
    copy_workflow(tmp_path)
    from workflow_helpers import planned_jobs

    jobs = planned_jobs(snakemake(tmp_path, "-n", "figs/niah_heatmap_99.png"))
    # 2 models x (full + 3 policies x 3 sparsities) scoring jobs
    assert jobs["niah_score"] == 20 and jobs["niah_prompts"] == 2 and jobs["niah_heatmap"] == 1


def test_intervention_needs_the_capture_only_for_auto_heads(tmp_path, topics_jsonl):
    from workflow_helpers import planned_jobs

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
    from workflow_helpers import planned_jobs

    copy_workflow(tmp_path / "default")
    jobs = planned_jobs(snakemake(tmp_path / "default", "-n"))
    assert jobs["induction_scores"] == 2 and jobs["induction_causal"] == 2
    assert jobs["induction_cross_figure"] == 3 and jobs["induction_model_figure"] == 6
    copy_workflow(tmp_path / "lag1", {"induction": {"lags": [1, 4]}})
    proc = snakemake(tmp_path / "lag1", "-n", check=False)
    assert proc.returncode != 0
    assert "config error at induction.lags.0" in proc.stderr and "Traceback" not in proc.stderr
