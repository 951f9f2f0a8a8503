"""End-to-end: induction heads with both registry models."""

import json

import polars as pl
import pytest

from workflow_helpers import copy_workflow, snakemake

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
