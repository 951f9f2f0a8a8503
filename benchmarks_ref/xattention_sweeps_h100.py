"""Microbench: XAttention's estimate kernel (kernels.xattention.block_shares) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256, bf16, block 128, stride 8), one row per
query block, every causal key (a global layer) and from a 512-key window's first block (a
window layer): the kernel of 4700461 (two sweeps of the strided keys, the second
recomputing each product once the maxima are known; read from git, or from the file given
as the second argument) against the current one (one sweep, the sums per strided query
set aside and rescaled). Each timed by CUDA events around the call and by the profiler's
GPU time of the estimate kernel alone. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/xattention_sweeps_h100.py 32768 [old.py]"""

import sys

import torch
from _events import kernel_ms, median_event_ms, module_at, read_rel_diff, xattention_inputs

from attnlab.kernels import xattention as new

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
old = module_at("4700461", "src/attnlab/kernels/xattention.py", (sys.argv[2:] or [None])[0])
BS, ST = 128, 8
q, k, sc, lo, hi, xf = xattention_inputs(T)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for fb, name in ((None, "causal"), (xf, "window")):
    first = torch.zeros_like(lo) if fb is None else fb
    a = old.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)
    b = new.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)
    e = read_rel_diff(a, b, first)
    times = []
    for mod in (old, new):
        fn = lambda mod=mod, fb=fb: mod.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)  # noqa: E731
        times += [median_event_ms(fn, 20), kernel_ms(fn, "share")]
    print(
        f"{name}: two sweeps {times[0]:.3f} ms (kernel {times[1]:.3f}) | one sweep"
        f" {times[2]:.3f} ms (kernel {times[3]:.3f}) | max rel diff {e:.1e}",
        flush=True,
    )
