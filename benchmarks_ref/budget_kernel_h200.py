"""The fused budget kernel against its previous form, side by side on one GPU (a one-off
comparison kept with its output, budget_kernel_h200.txt; not a product benchmark).

The previous form sorted each row (``tl.sort`` of packed 64-bit keys); the current one
searches each row's threshold. Both are timed as a caller runs them: the whole
``budget_select`` call, its zero-filled keep-mask and lists included, with the row bands
found once outside the timing, on grids a 32k prefill makes (4 heads, 16-token blocks:
2048 x 2048; causal rows or 33-block window bands) and a 128k causal grid of 8 heads.
Every case checks that both select the same blocks with the same list lengths, and (up
to 2048 blocks) that they equal the PyTorch selection.

    git show ac3e9dd^:src/attnlab/kernels/budget.py > /tmp/budget_sort.py
    PYTHONPATH=src python benchmarks_ref/budget_kernel_h200.py /tmp/budget_sort.py
"""

import functools
import importlib.util
import statistics
import sys

import torch

from attnlab.kernels import budget as new
from attnlab.policies.selection import keep_blocks_by_budget

spec = importlib.util.spec_from_file_location("budget_sort", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.manual_seed(0)
dev = "cuda"


def case(m, h, window=None, sparsity=0.99):
    rows = torch.arange(m, device=dev)
    vis = rows[None, :] <= rows[:, None]
    if window:
        vis &= rows[None, :] > rows[:, None] - window
    count = (vis.long() * 16)[None, None]
    score = torch.randn(1, h, m, m, device=dev)
    score[..., 0] = float("inf")
    score.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    budget = ((rows + 1) * 16 * (1 - sparsity)).long().clamp(min=1)[None, None].expand(1, h, m)
    return score, count, budget


def median_ms(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


CASES = [
    ("causal 32k 99%", 2048, 4, None, 0.99),
    ("causal 32k 90%", 2048, 4, None, 0.90),
    ("window 32k 99%", 2048, 4, 33, 0.99),
    ("causal 128k 99% (H=8)", 8192, 8, None, 0.99),
]
for name, m, h, window, sp in CASES:
    score, count, budget = case(m, h, window, sp)
    ap = window is not None
    bands = new.row_bands(count)
    kn, ln = new.budget_select(score, count, budget, ap, bands)
    ko, lo = old.budget_select(score, count, budget, ap, old.row_bands(count))
    nums = zip(ln, lo, strict=True)
    same = torch.equal(kn, ko) and all(
        torch.equal(x, y) for x, y in nums if x is not None and x.dim() == 3
    )
    ref = torch.equal(kn, keep_blocks_by_budget(score, count, budget)) if m <= 2048 else "n/a"
    tn = median_ms(functools.partial(new.budget_select, score, count, budget, ap, bands))
    to = median_ms(functools.partial(old.budget_select, score, count, budget, ap, bands))
    print(
        f"{name}: sort {to:.3f} ms, threshold {tn:.3f} ms, ratio {to / tn:.2f}x;"
        f" equal keep+nums {same}, equal to PyTorch {ref}"
    )
