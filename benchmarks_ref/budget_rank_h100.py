"""In-model A/B of the budget kernel's rank path (``kernels.budget.RANK_MAX``, ee6a5ca, gone
since: the search was faster): a window's band of at most 64 blocks ranks each block
among the row's others in one reduction (``rank``), against the threshold search every
longer row takes (``search``, RANK_MAX 0: no row ranks). One process per path, since the
kernel reads RANK_MAX when it compiles: a 32k prefill of a Gemma-3-270M of the real
config and random weights, bf16, per policy and sparsity the profiler's GPU time of every
kernel of one prefill and of the budget kernel's, and a CUDA-event median of 6 prefills;
each run saves its last logits and the second compares them with the first's. It needs
the budget kernel of 80afc79, where RANK_MAX was (budget_rank_h100.txt: its run there).
From the repository root, with each path's own Triton cache:
git checkout 80afc79 -- src/attnlab/kernels/budget.py
PYTHONPATH=src python benchmarks_ref/budget_rank_h100.py rank A.pt
PYTHONPATH=src python benchmarks_ref/budget_rank_h100.py search B.pt A.pt"""

import statistics
import sys

import torch
import triton.language as tl

from _events import call_kernel_ms, event_ms, random_gemma_prefill
from attnlab.kernels import budget

CASES = ("quest", 0.99), ("quest", 0.9), ("coarse_magnitude", 0.99)
if sys.argv[1] == "search":
    budget.RANK_MAX = tl.constexpr(0)
prefill = random_gemma_prefill(32768)
print(sys.argv[1], torch.cuda.get_device_name(), flush=True)
logits = {}
with torch.inference_mode():
    for name, s in CASES:
        logits[f"{name}:{s}"] = prefill(name, s).float().cpu()
        prefill(name, s)

        def fn(name=name, s=s):
            return prefill(name, s)

        total, kernel = call_kernel_ms(fn, "_budget_kernel")
        times = [event_ms(fn) for _ in range(6)]
        print(
            f"{name} {s}: kernels {total:.2f} ms, budget kernel {kernel:.3f} ms,"
            f" events median {statistics.median(times):.2f} ms",
            flush=True,
        )
torch.save(logits, sys.argv[2])
if len(sys.argv) > 3:
    other = torch.load(sys.argv[3])
    same = {k: torch.equal(v, other[k]) for k, v in logits.items()}
    print("logits equal to the other path's:", same)
