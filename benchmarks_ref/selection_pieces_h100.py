"""Microbench: the pieces of the fused selections at Gemma-3-270M's shapes (32k, H=4, Hkv=1,
D=256, bf16, 16-token blocks; XAttention's 128-token blocks, stride 8): CAB's coarsening
(the reference PyTorch one the scoring path takes, and Triton's), adjacency, curvature in
ieee / tf32x3 / tf32 (tf32x3 added to the kernels' precisions here only), a global layer
("causal") and a window layer's bands ("window"); cab_scores in both forms; XAttention's
estimate at G rows a program; Quest's page bounds and bound kernel (with and without the
rows' bands); the budget kernel on a global layer's and a window layer's bands. Medians of
CUDA events. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/selection_pieces_h100.py 32768"""

import torch
from _events import median_event_ms
import triton
from attnlab.kernels import reference
from attnlab.kernels.coarsen import coarsen_max_l2 as coarsen_triton
from attnlab.kernels.adjacency import adjacency_and_degrees
from attnlab.kernels.curvature import forman_ricci_from_degrees
from attnlab.kernels.cab import cab_scores
from attnlab.kernels.xattention import block_shares

import os, sys
import attnlab.kernels.adjacency as adj

adj.PRECISIONS = (*adj.PRECISIONS, "tf32x3")
dev = os.environ.get("DEV", "cuda")
T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
H, D, BS = 4, 256, 16
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
sc = D**-0.5
M = T // BS


def timeit(fn, reps=20):
    if dev == "cpu":  # a check under the interpreter: each piece runs once, untimed
        fn()
        return 0.0
    return median_event_ms(fn, reps)


print(
    torch.__version__,
    triton.__version__,
    dev == "cuda" and torch.cuda.get_device_name(),
    flush=True,
)
blk = torch.arange(M, device=dev)
first = ((blk * BS - 511).clamp(min=0) // BS).to(torch.int32)
print("coarsen ref q %.3f" % timeit(lambda: reference.coarsen_max_l2(q, BS)), flush=True)
print("coarsen triton q %.3f" % timeit(lambda: coarsen_triton(q, BS)), flush=True)
qc, kc = reference.coarsen_max_l2(q, BS), reference.coarsen_max_l2(k, BS)
ref_f = {}
for prec in ("ieee", "tf32x3", "tf32"):
    try:
        f = lambda: adjacency_and_degrees(
            qc, kc, sc, "softmax", fill_upper=False, precision=prec, a_dtype=torch.float32
        )
        print(f"adjacency {prec} %.3f" % timeit(f), flush=True)
        a, dout, din = f()
        for fb, name in ((None, "causal"), (first, "window")):
            g = lambda: forman_ricci_from_degrees(a, dout, din, "symmetric", prec, 128, first=fb)
            gd = lambda: forman_ricci_from_degrees(a, dout, din, "directed", prec, 128, first=fb)
            print(
                f"curvature {prec} {name} symmetric %.3f directed %.3f" % (timeit(g), timeit(gd)),
                flush=True,
            )
            if fb is None:
                fv = torch.nan_to_num(g().tril(), 0.0)
                ref_f.setdefault("ieee", fv)
                e = (fv - ref_f["ieee"]).abs().max().item() / ref_f["ieee"].abs().max().item()
                print(f"  max |F - F_ieee| / max |F_ieee| = {e:.2e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(prec, "ERR", type(e).__name__, str(e)[:200], flush=True)
for fb, name in ((None, "causal"), (first, "window")):
    print(
        f"cab_scores prompt {name} %.3f"
        % timeit(lambda: cab_scores(q, k, BS, sc, "prompt", first=fb)),
        flush=True,
    )
    print(
        f"cab_scores causal {name} %.3f"
        % timeit(lambda: cab_scores(q, k, BS, sc, "causal", first=fb)),
        flush=True,
    )
xb, st = 128, 8
mq = T // xb
lo = torch.arange(mq, device=dev) * (xb // st)
hi = lo + xb // st
xf = ((torch.arange(mq, device=dev) * xb - 511).clamp(min=0) // xb).to(torch.int32)
for g in (1, 2, 4):
    for fb, name in ((None, "causal"), (xf, "window")):
        try:
            print(
                f"xattention shares G={g} {name} %.3f"
                % timeit(
                    lambda: block_shares(q, k, lo, hi, st, xb, sc, first=fb, rows_per_program=g)
                ),
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            print("xattention G", g, "ERR", type(e).__name__, str(e)[:200], flush=True)
# Quest's bound and the budget kernel, global (causal bands) and window layers
from attnlab.kernels.quest import page_bound
from attnlab.kernels.budget import budget_select, causal_bands, window_bands
from attnlab.policies.quest import page_bounds

rows = torch.arange(0, T, BS, device=dev)
qr = q[:, :, rows]
print(
    "quest page_bounds (torch) %.3f" % timeit(lambda: page_bounds(k, BS, float32=False)), flush=True
)
lo_, hi_ = page_bounds(k, BS, float32=False)
print("quest page_bound kernel %.3f" % timeit(lambda: page_bound(qr, lo_, hi_)), flush=True)
print("coarsen ref k %.3f" % timeit(lambda: reference.coarsen_max_l2(k, BS)), flush=True)
print("q.float().pow(2).sum %.3f" % timeit(lambda: q.float().pow(2).sum(-1)), flush=True)
sc_ = page_bound(qr, lo_, hi_)
cb = causal_bands(M, dev)
cnt = torch.full((1, 1, M, M), BS, dtype=torch.int32, device=dev).tril()
bud = (torch.arange(M, device=dev) * BS + BS).mul(0.05).long().clamp(min=1)[None, None]
print(
    "budget causal lists %.3f" % timeit(lambda: budget_select(sc_, cnt, bud, False, cb)), flush=True
)
wb = window_bands(T, BS, 512, dev)
i_ = torch.arange(M, device=dev)
wcnt = (
    ((i_[None, :] <= i_[:, None]) & (i_[None, :] >= (i_[:, None] * BS - 511).clamp(min=0) // BS))
    .int()
    .mul(BS)[None, None]
)
print(
    "budget window lists %.3f" % timeit(lambda: budget_select(sc_, wcnt, bud, True, wb)), flush=True
)
print(
    "zeros int32 MxM x4 heads %.3f"
    % timeit(lambda: torch.zeros(1, H, M, M, dtype=torch.int32, device=dev)),
    flush=True,
)
last_ = torch.arange(M, device=dev, dtype=torch.int32)
print(
    "quest page_bound causal bands %.3f"
    % timeit(lambda: page_bound(qr, lo_, hi_, bands=(torch.zeros_like(last_), last_))),
    flush=True,
)
print(
    "quest page_bound window bands %.3f"
    % timeit(lambda: page_bound(qr, lo_, hi_, bands=(first, last_))),
    flush=True,
)
