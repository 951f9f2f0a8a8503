"""End-to-end: the capture and intervention stages with Gemma-3-270M on a corpus of Python's
help topics, a killed capture job and its resumption."""

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from workflow_helpers import copy_workflow, planned_jobs, snakemake

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
    deadline = time.monotonic() + 900
    while not _shards_done(workdir):
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
        "shards_done": len(_shards_done(workdir)),
        "planned": planned_jobs(snakemake(workdir, "-n", target)),
    }
    (workdir / "killed.json").write_text(json.dumps(left))


def _shards_done(workdir) -> list[str]:
    """The shards a rerun takes as finished: its metrics file and, for a shard with Q/K
    rows (offset below the config's qk_chunks), its Q/K file too, which the capture
    writes after the metrics: a metrics file alone is a shard cut off mid-write."""
    from attnlab.capture import QK_SUFFIX

    manifest = workdir / "results/corpus/gemma3-270m/manifest.json"
    qk_chunks = yaml.safe_load((workdir / "tiny.yaml").read_text())["capture"]["qk_chunks"]
    done = []
    for work in (workdir / "results/capture/gemma3-270m").glob(".capture-work-*"):
        offset = 0
        for shard in json.loads(manifest.read_text())["shards"]:
            stem = Path(shard["file"]).stem
            finished = (work / "metrics" / f"{stem}.parquet").exists() and (
                offset >= qk_chunks or (work / "qk" / f"{stem}{QK_SUFFIX}").exists()
            )
            done += [stem] if finished else []
            offset += shard["chunks"]
    return done


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
