"""Microbench: the symmetric graph's curvature from a W formed once (``symmetrized``: plain
tiles, two loads a k step) against W formed inside the product (four masked loads, one
transposed; the module of ``OLD``), at Gemma-3-270M's shapes (32k tokens, bf16 Q and K,
H=4 query heads of one key head, D=256, 16-token blocks; a 512-key window's bands, or a
global layer). Part 1: CAB's scored scores (``cab_scores``: float32 A, ieee products) per
variant whose graph is symmetric, old and new, each with whether the two score tensors are
equal bit for bit. Part 2: the prompt form's curvature alone in the new kernel at several
k steps (``block_k``), equal or not to the old kernel's F on and below the diagonal. Medians of
CUDA-event timings (ms) after 3 warm-ups. Run from the repository root:

    PYTHONPATH=src:benchmarks_ref python benchmarks_ref/curvature_symmetrized_h100.py \
        OLD_CURVATURE_PY [T]

with OLD_CURVATURE_PY the file src/attnlab/kernels/curvature.py of the commit before
``symmetrized`` (e.g. ``git show 2f6d3f3:src/attnlab/kernels/curvature.py > old.py``).
Output and the commit that made it: curvature_symmetrized_h100.txt."""

import sys

import torch
from _events import median_event_ms, module_at

import attnlab.kernels.cab as cab
from attnlab.kernels import curvature
from attnlab.kernels.adjacency import adjacency_and_degrees
from attnlab.kernels.reference import coarsen_max_l2

old = module_at("old", "src/attnlab/kernels/curvature.py", sys.argv[1])
dev, T, H, D, W = "cuda", int(sys.argv[2]) if len(sys.argv) > 2 else 32768, 4, 256, 512
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)  # the model's dtype
k = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16).expand(-1, H, -1, -1)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def firsts(bs):
    blocks = torch.arange(T // bs, device=dev)
    return ((blocks * bs - W + 1).clamp(min=0) // bs).int()  # a first row's window edge


def scores(module, bs, form, query, first):
    cab.forman_ricci_from_degrees = module.forman_ricci_from_degrees
    cab.causal_forman_ricci = module.causal_forman_ricci
    return cab.cab_scores(q, k, bs, D**-0.5, form, query=query, first=first)


VARIANTS = {  # name: block, form, query (the symmetric graph's, softmax adjacency)
    "cab": (16, "prompt", "block"),
    "cab_causal": (16, "causal", "block"),
    "cab_query": (16, "prompt", "row"),
    "cab_b64": (64, "prompt", "block"),
}
for name, (bs, form, query) in VARIANTS.items():
    for layer, first in (("global", None), ("window", firsts(bs))):
        row = []
        for label, module in (("old", old), ("new", curvature)):
            case = (bs, form, query, first)
            ms = median_event_ms(lambda m=module, c=case: scores(m, *c), reps=10)
            row.append(f"{label} {ms:.3f} ms")
        same = torch.equal(
            scores(old, bs, form, query, first), scores(curvature, bs, form, query, first)
        )
        print(f"{name} {layer}: " + " | ".join(row) + f" | equal bit for bit: {same}", flush=True)

m = T // 16
a, d_out, d_in = adjacency_and_degrees(
    coarsen_max_l2(q, 16), coarsen_max_l2(k, 16), D**-0.5, "softmax", fill_upper=False,
    block_m=64, align=128, precision="ieee", a_dtype=torch.float32, block_n=64, num_warps=4,
)  # fmt: skip
lower = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
new, run = curvature.forman_ricci_from_degrees, old.forman_ricci_from_degrees
for layer, tile, first, steps in (
    ("global", 128, None, (16, 32, 64)),
    ("window", 16, firsts(16), (16, 32, 64, 128, 256)),
):
    args = (a, d_out, d_in, "symmetric", "ieee", tile)
    ref = old.forman_ricci_from_degrees(*args, first=first)
    ms = median_event_ms(lambda c=args, f=first: run(*c, first=f), reps=10)
    row = [f"old {ms:.3f} ms"]
    for bk in steps:
        got = curvature.forman_ricci_from_degrees(*args, block_k=bk, first=first)
        same = torch.equal(got[..., lower], ref[..., lower])
        ms = median_event_ms(
            lambda b=bk, c=args, f=first: new(*c, block_k=b, first=f),
            reps=10,
        )
        row.append(f"k step {bk}: {ms:.3f} ms ({'equal' if same else 'DIFFERS'})")
    sym = median_event_ms(lambda: curvature.symmetrized(a), reps=10)
    print(f"curvature {layer} (tiles {tile}): " + " | ".join(row) + f" | W alone {sym:.3f} ms")
