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
