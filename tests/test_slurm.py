"""The cluster path on a real SLURM: ``snakemake --profile`` with a copy of profiles/slurm,
through snakemake-executor-plugin-slurm, against a private one-node cluster that the test
starts (tests/slurm_cluster.py) and stops."""

import subprocess
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

import slurm_cluster
from workflow_helpers import REPO, copy_workflow, planned_jobs, snakemake, snakemake_command

TINY = {
    "models": ["smollm2-135m"],
    "threads": 2,
    "niah": {
        "lengths": [512],
        "depths": [0.5],
        "sparsities": [0.9],
        "regimes": {"prefill": ["streamingllm"]},
    },
}
TARGET = "results/niah/prefill/smollm2-135m/streamingllm_90.parquet"
# the CPUs each job should get: the rule's threads (model_info sets 2, niah_prompts none)
THREADS = {"model_info": 2, "niah_prompts": 1, "niah_score": TINY["threads"]}
RUN_TIMEOUT_S = 600


@pytest.fixture
def slurm(tmp_path):
    """A running one-node SLURM with one (stand-in) GPU; skipped, in one line, where this
    machine cannot start one."""
    why = slurm_cluster.missing()
    if why is None and find_spec("snakemake_executor_plugin_slurm") is None:
        why = "snakemake-executor-plugin-slurm not installed (`pip install -e '.[dev]'`)"
    if why:
        pytest.skip(why)
    with slurm_cluster.one_node_cluster(tmp_path / "slurm", gpus=1) as cluster:
        yield cluster


def _minutes(limit: str) -> float:
    """A SLURM TimeLimit, [D-]HH:MM:SS, in minutes."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, seconds = map(int, clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def test_profile_runs_each_rule_as_a_slurm_job(slurm, tmp_path):
    """The user's command, ``snakemake --profile <copy of profiles/slurm>``, on a tiny NIAH
    config: every rule is its own SLURM job, granted the CPUs (the rule's threads), memory,
    runtime and GPU its profile asks for, as slurmctld records them; each job's output file
    is there; no process of the cluster uses an address but 127.0.0.1; and the tables
    equal a local run's, byte for byte."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    # The copy's overrides: memory capped at the node's (a no-op where it has 16 GB);
    # the first status check after 1 s, not 40 (the plugin then backs off by 10 s a check);
    # the jobs' output files kept, to be read below.
    asked = {
        rule: res | {"mem_mb": min(res["mem_mb"], slurm.mem_mb)}
        for rule, res in profile["set-resources"].items()
    }
    profile |= {
        "set-resources": asked,
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-keep-successful-logs": True,
    }
    work = copy_workflow(tmp_path / "cluster", TINY)
    (work / "slurm-test").mkdir()
    (work / "slurm-test/config.yaml").write_text(yaml.safe_dump(profile))

    cmd, env = snakemake_command(work, "--profile", "slurm-test", TARGET)
    env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
    # the local run to compare with, beside the cluster's (which waits on status checks)
    local = copy_workflow(tmp_path / "local", TINY)
    local_cmd, local_env = snakemake_command(local, "--cores", "2", TARGET)
    addresses = set()
    with (
        open(tmp_path / "snakemake.log", "w") as log,
        open(tmp_path / "local.log", "w") as local_log,
    ):
        local_run = subprocess.Popen(
            local_cmd, cwd=local, env=local_env, stdout=local_log, stderr=subprocess.STDOUT
        )
        run = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while run.poll() is None and time.monotonic() < deadline:
            addresses |= slurm_cluster.tcp_addresses(slurm.processes())
            time.sleep(1)
        if run.poll() is None:
            run.terminate()  # Snakemake cancels its SLURM jobs on the way out
            run.wait(60)
        local_run.wait(max(1.0, deadline - time.monotonic()))
    output = (tmp_path / "snakemake.log").read_text()
    assert run.returncode == 0, output
    assert local_run.returncode == 0, (tmp_path / "local.log").read_text()
    assert addresses == {"127.0.0.1"}

    jobs = {}
    for job in slurm.jobs():
        rule = job["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        assert rule not in jobs, f"{rule} ran twice"
        jobs[rule] = job
    assert set(jobs) == set(THREADS)
    for rule, job in jobs.items():
        ask = asked[rule]
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["NodeList"] == slurm.node
        assert int(job["NumCPUs"]) == THREADS[rule], rule
        assert job["Mem"] == str(ask["mem_mb"]), rule  # what the node gave the job
        assert _minutes(job["TimeLimit"]) == ask["runtime"], rule
        gpus = ask.get("gpu", 0)
        assert job["JOB_GRES"] == (f"gpu:{gpus}" if gpus else "(null)"), rule
        out = Path(job["StdOut"])
        assert out.is_relative_to(work / ".snakemake/slurm_logs" / f"rule_{rule}"), out
        assert f"rule {rule}:" in out.read_text() and "(100%) done" in out.read_text(), out
    assert asked["niah_score"].get("gpu") == 1  # the profile's model jobs ask for a GPU

    files = {
        d: sorted(f.relative_to(d) for f in (d / "results").rglob("*.*")) for d in (work, local)
    }
    assert files[work] == files[local] and Path(TARGET) in files[work]
    for f in files[work]:
        assert (work / f).read_bytes() == (local / f).read_bytes(), f
    assert planned_jobs(snakemake(work, "-n", TARGET)) == {}
