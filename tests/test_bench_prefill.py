"""The prefill benchmark times the real model under each policy, and its table joins the
NIAH table into the accuracy-matched speed figure."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from attnlab import niah, tables
from attnlab.errors import UserError
from attnlab.plots import niah_latency

ATTNLAB = str(Path(sys.executable).parent / "attnlab")


def test_prefill_bench_times_each_policy_and_joins_its_accuracy(smollm2, tmp_path):
    _, tok, _ = smollm2
    prompts = niah.make_prompts(tok, [80, 128], [0.5], 1, 0)
    tables.write([p.__dict__ for p in prompts], tmp_path / "prompts.parquet")
    args = ["bench", "prefill", "--model", "smollm2-135m", "--prompts"]
    args += [str(tmp_path / "prompts.parquet"), "--length", "128", "--rep-ms", "1"]
    args += ["--policies", "full", "topk", "cab", "cab_b32", "--sparsities", "0.5", "0.8"]
    args += ["--policy-params", json.dumps({"cab_b32": {"base": "cab", "block_size": 32}})]
    args += ["--row-chunk", "32", "--threads", "1", "--out", str(tmp_path)]
    args += ["--transformers", "sdpa"]
    proc = subprocess.run([ATTNLAB, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = pl.read_parquet(tmp_path / "prefill.parquet")
    hf = bench.filter(pl.col("implementation") != "attnlab")
    assert hf.select("policy", "implementation", "kernel").rows() == [
        ("full", "transformers sdpa", "sdpa")
    ]
    bench = bench.filter(pl.col("implementation") == "attnlab")
    assert bench.select("policy", "target_sparsity").rows() == [
        ("full", 0.0),
        ("topk", 0.5),
        ("topk", 0.8),
        ("cab", 0.5),
        ("cab", 0.8),
        ("cab_b32", 0.5),  # a variant, built from its base and settings
        ("cab_b32", 0.8),
    ]
    assert (bench["length"] == 128).all() and (bench["ms"] > 0).all()
    assert (bench["regime"] == "prefill").all()
    assert (bench["reps"] >= 3).all()
    kernels = dict(zip(bench["policy"], bench["kernel"], strict=False))
    assert kernels == {  # SmolLM2's 30 layers are causal; FlexAttention on CUDA only
        "full": "sdpa causal x30",
        "topk": "sdpa keep-mask in row chunks x30",
        "cab": "sdpa keep-mask x30",
        "cab_b32": "sdpa keep-mask x30",
    }
    topk = bench.filter(pl.col("policy") == "topk")["achieved_sparsity"].to_list()
    assert abs(topk[0] - 0.5) < 0.02 and abs(topk[1] - 0.8) < 0.02
    assert bench.filter(pl.col("policy") == "full")["speedup_vs_full"].to_list() == [1.0]
    # each entry against full attention timed in the same rounds
    assert (bench["full_ms"] > 0).all() and (hf["full_ms"] > 0).all()
    ratio = pl.concat([bench, hf]).select(
        pl.col("full_ms") / pl.col("ms") - pl.col("speedup_vs_full")
    )
    assert ratio.to_series().abs().max() < 1e-12
    # where each entry's time went (one more pass): full attention chooses nothing, every
    # policy spends time choosing, and the attention kernels and the rest of the model
    # take time in every entry
    achieved = {
        name: bench.filter(pl.col("policy") == name)["achieved_sparsity"].to_list()
        for name in ("cab", "cab_b32")
    }
    assert achieved["cab"] != achieved["cab_b32"], achieved  # its own blocks
    split = dict(zip(bench["policy"], bench["selection_ms"], strict=False))
    assert split["full"] == 0.0 and split["topk"] > 0 and split["cab"] > 0
    assert (bench["attention_ms"] > 0).all() and (bench["rest_ms"] > 0).all()
    assert hf["selection_ms"].is_nan().all() and hf["host_ms"].is_nan().all()
    # on the CPU the kernels run as they are issued: the host's time is the pass's
    parts = bench["selection_ms"] + bench["attention_ms"] + bench["rest_ms"]
    assert (bench["host_ms"] >= parts).all()

    # a NIAH table of known accuracy at that length (and another length, left out)
    rows = [
        {
            "model": "m",
            "regime": r,
            "task": "passkey",
            "policy": p,
            "target_sparsity": s,
            "length": n,
            "depth": d,
            "correct": c,
            "feasible": True,
            "selection": "prompt" if p == "cab" else "causal",  # as the benchmark timed
        }
        for r in ("prefill", "cache")
        for p, s, c in [
            ("full", 0.0, True),
            ("topk", 0.5, True),
            ("topk", 0.8, False),
            ("cab", 0.5, r == "cache"),
            ("cab", 0.8, False),
        ]
        for n in (128, 80)
        for d in (0.0, 1.0)
    ]
    tables.write(rows, tmp_path / "niah.parquet")
    joined = niah_latency.accuracy_latency(tmp_path / "niah.parquet", tmp_path / "prefill.parquet")
    got = {
        (r["policy"], r["target_sparsity"]): r["accuracy"] for r in joined.iter_rows(named=True)
    }  # the prefill regime alone: a cache-regime prompt runs dense
    assert got == {
        ("full", 0.0): 1.0,
        ("topk", 0.5): 1.0,
        ("topk", 0.8): 0.0,
        ("cab", 0.5): 0.0,
        ("cab", 0.8): 0.0,
    }
    assert set(joined["prompts"]) == {2} and set(joined["regime"]) == {"prefill"}
    niah_latency.plot_latency(
        tmp_path / "niah.parquet", tmp_path / "prefill.parquet", tmp_path / "fig.png"
    )
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    # a speed counts only for the selection scored: CAB's rows scored in the causal form do
    # not pair with its prompt-form timing; a benchmark that records no form is refused
    causal = pl.read_parquet(tmp_path / "niah.parquet").with_columns(selection=pl.lit("causal"))
    tables.write(causal.to_arrow(), tmp_path / "causal.parquet")
    joined = niah_latency.accuracy_latency(
        tmp_path / "causal.parquet", tmp_path / "prefill.parquet"
    )
    assert "cab" not in joined["policy"].to_list() and "topk" in joined["policy"].to_list()
    pl.read_parquet(tmp_path / "prefill.parquet").drop("selection").write_parquet(
        tmp_path / "old.parquet"
    )
    with pytest.raises(UserError, match="predates the selection forms"):
        niah_latency.accuracy_latency(tmp_path / "niah.parquet", tmp_path / "old.parquet")


def test_generate_bench_times_one_token_per_cache_policy(smollm2, tmp_path):
    _, tok, _ = smollm2
    prompts = niah.make_prompts(tok, [128], [0.5], 1, 0)
    tables.write([p.__dict__ for p in prompts], tmp_path / "prompts.parquet")
    args = ["bench", "generate", "--model", "smollm2-135m", "--prompts"]
    args += [str(tmp_path / "prompts.parquet"), "--length", "128", "--rep-ms", "1"]
    args += ["--policies", "topk", "snapkv", "--sparsities", "0.5", "0.9"]
    args += ["--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run([ATTNLAB, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bench = pl.read_parquet(tmp_path / "generate.parquet")
    assert bench.select("policy", "target_sparsity").rows() == [
        ("full", 0.0),
        ("topk", 0.5),
        ("topk", 0.9),
        ("snapkv", 0.5),
        ("snapkv", 0.9),
    ]
    assert (bench["regime"] == "cache").all() and (bench["length"] == 128).all()
    assert (bench["ms"] > 0).all() and (bench["reps"] >= 5).all()
    assert bench["speedup_vs_full"][0] == 1.0


def test_a_run_that_records_nothing_selects_the_same(smollm2):
    from attnlab import decoding, policies, sparse

    model, tok, _ = smollm2
    ids = torch.tensor([niah.make_prompts(tok, [128], [0.5], 1, 0)[0].input_ids])
    runs = [
        sparse.SparseRun(policies.make("quest"), 0.8, records=records) for records in (True, False)
    ]
    logits = [decoding.prefill(model, ids, r)[1] for r in runs]
    assert torch.equal(logits[0], logits[1])
    assert (
        runs[0].recorder.kept == runs[1].recorder.kept
        and runs[0].recorder.recall_sums
        and not runs[1].recorder.recall_sums
    )


def test_rounds_time_every_function_once_per_round_in_order():
    """``median_ms_rounds``: after two warm-up calls of each, every round calls each
    function once, in order, and each gets its own median over the same rounds."""
    from attnlab.bench.timing import median_ms_rounds

    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    timed = median_ms_rounds(fns, "cpu", rep_ms=0.0, min_reps=4, max_reps=4)
    assert [reps for _, reps in timed] == [4, 4, 4]
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 5  # the estimate's too
    assert all(ms >= 0 for ms, _ in timed)


def test_every_policy_the_figures_know_has_its_own_colour():
    """``policy_styles``: a colour per policy, the same in every figure, no two alike
    (the study draws more policies than one 20-colour map holds)."""
    from attnlab.plots.styles import POLICY_ORDER, policy_styles

    styles = policy_styles(["kvpress:KnormPress"])
    assert len(POLICY_ORDER) > 20 and set(styles) >= {*POLICY_ORDER, "kvpress:KnormPress"}
    colours = [
        tuple(s["color"]) if not isinstance(s["color"], str) else s["color"]
        for s in styles.values()
    ]
    assert len(set(colours)) == len(colours)
    assert policy_styles(["cab"])["cab"] == styles["cab"]
