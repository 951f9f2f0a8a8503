"""Microbench: XAttention's estimate kernel (kernels.xattention.block_shares) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256, bf16, block 128, stride 8), one row per
query block, every causal key (a global layer) and from a 512-key window's first block (a
window layer): the kernel of acb8893 (each program sweeps its rows' every strided key;
read from git, or from the file given as the second argument) against the current one,
whose sweeps split among programs every ``split_keys`` strided keys (128 to 4096;
4096: one split at 32k) and a second kernel joins. Each timed by CUDA events around the call
and by the profiler's GPU time of the estimate's kernels. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/xattention_splits_h100.py 32768 [old.py]"""

import sys

import torch
from _events import kernel_ms, median_event_ms, module_at, read_rel_diff, xattention_inputs

from attnlab.kernels import xattention as new

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
old = module_at("acb8893", "src/attnlab/kernels/xattention.py", (sys.argv[2:] or [None])[0])
BS, ST = 128, 8
q, k, sc, lo, hi, xf = xattention_inputs(T)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for fb, name in ((None, "causal"), (xf, "window")):
    first = torch.zeros_like(lo) if fb is None else fb
    a = old.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)

    def one(fb=fb):
        return old.block_shares(q, k, lo, hi, ST, BS, sc, first=fb)

    line = f"{name}: one sweep {median_event_ms(one, 20):.3f} ms (kernel"
    line += f" {kernel_ms(one, 'share'):.3f})"
    for keys in (128, 256, 512, 1024, 2048, 4096):

        def split(fb=fb, keys=keys):
            return new.block_shares(q, k, lo, hi, ST, BS, sc, first=fb, split_keys=keys)

        b = split()
        e = read_rel_diff(a, b, first)
        line += f" | splits of {keys} {median_event_ms(split, 20):.3f} ms (kernel"
        line += f" {kernel_ms(split, 'share'):.3f}, max rel diff {e:.1e})"
    print(line, flush=True)
