"""Microbench: XAttention's estimate kernel (kernels.xattention.block_shares) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256, bf16, block 128, stride 8), one row per
query block, every causal key (a global layer) and from a 512-key window's first block (a
window layer's second sweep): the kernel of 1317760 (the whole head dim a step, 2 rows of
16 strided queries a program, one stage; read from git) against the current one (64
channels a step, G rows a program, BN keys a step). Run from the repository root:
PYTHONPATH=src python benchmarks_ref/xattention_estimate_h100.py 32768"""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _events import median_event_ms

from attnlab.kernels import xattention as new

# the kernel as it stood at 1317760, from a file (Triton reads a kernel's source)
path = Path(tempfile.mkdtemp()) / "xattention_old.py"
path.write_bytes(
    subprocess.check_output(["git", "show", "1317760:src/attnlab/kernels/xattention.py"])
)
spec = importlib.util.spec_from_file_location("xattention_old", path)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
dev = "cuda"
T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
H, D, BS, ST = 4, 256, 128, 8
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
sc = D**-0.5


def timeit(fn, reps=20):
    return median_event_ms(fn, reps)


mq, per = T // BS, BS // ST
lo = torch.arange(mq, device=dev) * per
hi = lo + per
xf = ((torch.arange(mq, device=dev) * BS - 511).clamp(min=0) // BS).to(torch.int32)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for fb, name in ((None, "causal"), (xf, "window")):
    a = old.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)
    t_old = timeit(lambda: old.block_shares(q, k, lo, hi, ST, BS, sc, first=fb))
    for g, bn in ((None, 64), (2, 64), (4, 128)):
        try:
            b = new.block_shares(q, k, lo, hi, ST, BS, sc, first=fb, rows_per_program=g, block_n=bn)
            t = timeit(
                lambda: new.block_shares(
                    q, k, lo, hi, ST, BS, sc, first=fb, rows_per_program=g, block_n=bn
                )
            )
            m = torch.isfinite(a) & (a > 0)
            e = ((a - b).abs() / a.abs().clamp(min=1e-6))[m].max().item()
            print(
                f"{name} old {t_old:.3f} ms | new G={g} BN={bn} {t:.3f} ms (max rel diff {e:.1e})",
                flush=True,
            )
        except Exception as err:  # noqa: BLE001
            print(name, g, bn, "ERR", type(err).__name__, str(err)[:150], flush=True)
