"""Bad input at the command line the rules call: one line naming the problem, a non-zero
exit, no traceback, and no output file left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ATTNLAB = str(Path(sys.executable).parent / "attnlab")


def refused(*args: str, out: Path) -> str:
    proc = subprocess.run([ATTNLAB, *args], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("attnlab: error:")]
    assert len(errors) == 1, proc.stderr
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))
    return errors[0]


@pytest.fixture(scope="module")
def smollm2_info(tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "smollm2-135m.json"
    subprocess.run(
        [ATTNLAB, "model-info", "--model", "smollm2-135m", "--out", str(out)], check=True
    )
    return out


def test_unknown_model(tmp_path):
    out = tmp_path / "info.json"
    line = refused(
        "model-info", "--model", "no-such-org/no-such-model-xyz", "--out", str(out), out=out
    )
    assert "no-such-org/no-such-model-xyz" in line


def test_context_longer_than_the_model_allows(tmp_path, smollm2_info):
    out = tmp_path / "prompts.parquet"
    max_pos = json.loads(smollm2_info.read_text())["max_positions"]
    args = ["niah-prompts", "--model", "smollm2-135m", "--model-info", str(smollm2_info)]
    args += ["--lengths", "512", str(2 * max_pos), "--depths", "0.5", "--out", str(out)]
    args += ["--samples", "1", "--seed", "0", "--haystack", "noise", "--tasks", "passkey"]
    args += ["--needles", "4", "--templates", "{}"]
    line = refused(*args, out=out)
    assert str(2 * max_pos) in line and str(max_pos) in line


def test_corpus_path_that_does_not_exist(tmp_path):
    out = tmp_path / "manifest.json"
    args = ["corpus-shard", "--model", "smollm2-135m", "--source", "/no/such/dir/data.jsonl"]
    args += ["--keep-sets", "RedPajamaWikipedia", "--shards", str(tmp_path / "shards")]
    args += ["--split", "train", "--chunk-len", "512", "--max-chunks", "8", "--shard-size", "64"]
    line = refused(*args, "--manifest", str(out), out=out)
    assert "/no/such/dir/data.jsonl" in line
    assert not (tmp_path / "shards").exists()


def test_table_from_an_older_schema(tmp_path):
    old = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"length": [512], "depth": [0.5], "tokens": [[1, 2, 3]]}), old)
    out = tmp_path / "scores.parquet"
    args = ["niah-score", "--model", "smollm2-135m", "--prompts", str(old), "--regime"]
    args += ["prefill", "--runs", '[["full", {}, 0]]', "--shard", "1of1", "--tolerance"]
    args += ["0.005", "--seed", "0", "--threads", "1", "--device", "cpu", "--dtype", "float32"]
    args += ["--max-new-tokens", "8", "--row-chunk", "0"]
    line = refused(*args, "--out", str(out), out=out)
    assert str(old) in line and "older version" in line


def test_a_figure_without_the_option_it_takes(tmp_path):
    out = tmp_path / "heatmap.png"
    line = refused("plot", "niah-heatmap", "--table", "t.parquet", "--out", str(out), out=out)
    assert line == "attnlab: error: figure niah-heatmap needs --sparsity"


def _niah_score(tmp_path, regime, runs, shard):
    args = ["niah-score", "--model", "smollm2-135m", "--prompts", str(tmp_path / "p.parquet")]
    args += ["--regime", regime, "--runs", runs, "--shard", shard, "--tolerance", "0.005"]
    args += ["--max-new-tokens", "8", "--threads", "1", "--device", "cpu", "--dtype", "auto"]
    return args + ["--seed", "0", "--row-chunk", "0"]


@pytest.mark.parametrize("shard", ["3of2", "0of4", "two"])
def test_a_cache_shard_outside_its_count(tmp_path, shard):
    out = tmp_path / "cache.parquet"
    line = refused(*_niah_score(tmp_path, "cache", "[]", shard), "--out", str(out), out=out)
    assert "--shard" in line and shard in line


def test_the_prefill_regime_scores_one_run_a_job(tmp_path):
    out = tmp_path / "scores.parquet"
    runs = '[["topk", {}, 0.9], ["topk", {}, 0.99]]'
    line = refused(*_niah_score(tmp_path, "prefill", runs, "1of1"), "--out", str(out), out=out)
    assert line == "attnlab: error: the prefill regime scores one run over every prompt in a job"
    args = _niah_score(tmp_path, "decode", "[]", "1of1")
    assert "--regime must be one of cache, prefill" in refused(*args, "--out", str(out), out=out)


def test_a_bad_policy_setting_stops_the_prefill_bench_before_the_model_loads(tmp_path):
    """Every policy is built first: the stride that does not divide the block size is the
    error, not the model that would have taken minutes of timing to reach it."""
    out = tmp_path / "bench"
    params = {"xattention": {"block_size": 32, "stride": 5}}
    line = refused(
        "bench", "prefill", "--model", "no-such-org/no-such-model-xyz",
        "--prompts", str(tmp_path / "prompts.parquet"), "--length", "64",
        "--policies", "full", "xattention", "--policy-params", json.dumps(params),
        "--out", str(out), out=out / "prefill.parquet",
    )  # fmt: skip
    assert "xattention" in line and "no-such-model" not in line
