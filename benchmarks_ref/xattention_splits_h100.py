"""Microbench: XAttention's estimate kernel (kernels.xattention.block_shares) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256, bf16, block 128, stride 8), one row per
query block, every causal key (a global layer) and from a 512-key window's first block (a
window layer): the kernel of acb8893 (each program sweeps its rows' every strided key;
read from git, or from the file given as the second argument) against the current one,
whose sweeps split among programs every ``split_keys`` strided keys (128 to 4096;
4096: one split at 32k) and a second kernel joins. Each timed by CUDA events around the call
and by the profiler's GPU time of the estimate's kernels. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/xattention_splits_h100.py 32768 [old.py]"""

from _events import estimate_ab, kernel_ms, median_event_ms, read_rel_diff

from attnlab.kernels import xattention as new

BS, ST = 128, 8
old, (q, k, sc, lo, hi), cases = estimate_ab("acb8893")
for name, fb, first in cases:
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
