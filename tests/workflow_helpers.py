"""Run the real Snakemake on a copy of the workflow in a temporary directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = [
    "Snakefile",
    "rules",
    "schemas",
    "report",
    "profiles",
    "envs",
    "workflow_config.yaml",
    "results_ref",  # committed tables that rule all's figures render from
    "benchmarks_ref",  # the committed decode benchmark of the accuracy-matched table
]


def copy_workflow(dest: Path, config: dict | None = None, source: bool = False) -> Path:
    """The workflow's files in ``dest``, with ``config`` as tiny.yaml (one thread per job
    unless it says otherwise). With ``source``, a copy of the package too, which the runs
    then import (so a test may edit it)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    if source:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "src/attnlab", dest / "src/attnlab", ignore=ignore)
    if config is not None:
        # one torch thread per job, so that `--cores 2` runs two of these small jobs at once
        (dest / "tiny.yaml").write_text(yaml.safe_dump({"threads": 1} | config))
    return dest


def snakemake_command(workdir: Path, *args: str) -> tuple[list[str], dict]:
    """The command line and environment that :func:`snakemake` runs."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if (workdir / "src").is_dir():
        env["PYTHONPATH"] = str(workdir / "src")
    cmd = [str(Path(sys.executable).parent / "snakemake"), *args]
    if (workdir / "tiny.yaml").exists():
        cmd += ["--configfile", "tiny.yaml"]
    return cmd, env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``snakemake`` from this interpreter's environment, run in ``workdir``."""
    cmd, env = snakemake_command(workdir, *args)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table; empty when nothing to do."""
    lines = proc.stdout.splitlines()
    if "Job stats:" not in lines:
        return {}
    jobs = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        name, *count = line.split()
        if name == "total":
            break
        jobs[name] = int(count[0])
    return jobs
