"""The GPU profile's run semantics on the CPU (the same command the GPU study runs): a run
stopped midway and started again redoes only what is missing, and a failed job fails the
run after the others have finished."""

import signal
import subprocess
import time

import pytest

from workflow_helpers import copy_workflow, snakemake, snakemake_command

MODEL = "smollm2-135m"
TINY = {
    "models": [MODEL],
    "niah": {
        "lengths": [256],
        "depths": [0.5],
        "sparsities": [0.9],
        "regimes": {"cache": ["streamingllm"], "prefill": ["streamingllm", "cab", "xattention"]},
    },
    # passes the config check (each field in range) and fails in its jobs, where the policy
    # is built (its NIAH job and the prefill benchmark): the stride must divide the block
    # size
    "policies": {"xattention": {"block_size": 32, "stride": 5}},
}
PREFILL = f"results/niah/prefill/{MODEL}"
FINE = [  # every table the study writes that the failing job does not hold up
    f"results/niah/cache/{MODEL}/all.parquet",
    f"{PREFILL}/streamingllm_90.parquet",
    f"{PREFILL}/cab_90.parquet",
]
FAILING = [f"{PREFILL}/xattention_90.parquet", f"results/bench/{MODEL}/prefill.parquet"]
ARGS = ("--profile", "profiles/gpu", "--cores", "2", "niah_study")
STOP_AFTER_S = 600


@pytest.mark.e2e
def test_a_stopped_study_restarts_where_it_stopped_and_a_failed_job_fails_it(tmp_path):
    work = copy_workflow(tmp_path / "w", TINY)
    cmd, env = snakemake_command(work, *ARGS)
    # the first run, stopped (SIGTERM, as `timeout` stops it) once a score table is written
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + STOP_AFTER_S
    while not any((work / f).exists() for f in FINE[:3]) and proc.poll() is None:
        assert time.monotonic() < deadline, "no score table within the time allowed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    done = {f: (work / f).stat().st_mtime_ns for f in FINE if (work / f).exists()}
    assert done and len(done) < len(FINE), "the stop came before or after every table"

    # the same command again: what was done stays, the rest is made, the failed job fails
    # the run once every other job has finished
    again = snakemake(work, *ARGS, check=False)
    assert again.returncode != 0
    log = again.stdout + again.stderr
    assert "Error in rule niah_score" in log and "xattention" in log
    assert not any((work / f).exists() for f in FAILING)
    for f in FINE:
        assert (work / f).exists(), f
    for f, mtime in done.items():
        assert (work / f).stat().st_mtime_ns == mtime, f"{f} was made again"
    planned = {f for f in FINE if f not in done} | set(FAILING)
    for f in FINE:
        assert (f in planned) == (f"output: {f}" in log), f
    assert not (work / "results/niah/niah.parquet").exists()  # it needs the failed table
