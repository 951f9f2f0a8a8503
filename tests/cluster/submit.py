"""A stand-in for ``sbatch`` in the cluster test: records what Snakemake asked for, then
runs the job script as a separate local process, detached, and prints its job id.

Usage: submit.py RECORD_DIR RULE THREADS MEM_MB RUNTIME GPU JOBSCRIPT
"""

import json
import subprocess
import sys
from pathlib import Path

record_dir, rule, threads, mem_mb, runtime, gpu, jobscript = sys.argv[1:]
record_dir = Path(record_dir)
record_dir.mkdir(parents=True, exist_ok=True)
log = open(record_dir / f"{rule}.{Path(jobscript).stem}.log", "w")
proc = subprocess.Popen(
    ["bash", jobscript], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
)
record = {"rule": rule, "threads": int(threads), "mem_mb": int(mem_mb), "runtime": int(runtime)}
record["gpu"] = int(gpu)
record |= {"jobscript": Path(jobscript).read_text(), "pid": proc.pid}
(record_dir / f"{rule}.{proc.pid}.json").write_text(json.dumps(record))
print(proc.pid)
