"""Microbench: XAttention's estimate kernel (kernels.xattention.block_shares) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256, bf16, block 128, stride 8), one row per
query block, every causal key (a global layer) and from a 512-key window's first block (a
window layer): the kernel of 4700461 (two sweeps of the strided keys, the second
recomputing each product once the maxima are known; read from git, or from the file given
as the second argument) against the current one (one sweep, the sums per strided query
set aside and rescaled). Each timed by CUDA events around the call and by the profiler's
GPU time of the estimate kernel alone. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/xattention_sweeps_h100.py 32768 [old.py]"""

from _events import estimate_ab, kernel_ms, median_event_ms, read_rel_diff

from attnlab.kernels import xattention as new

BS, ST = 128, 8
old, (q, k, sc, lo, hi), cases = estimate_ab("4700461")
for name, fb, first in cases:
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
