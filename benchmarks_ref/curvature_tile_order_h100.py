"""Microbench: the launch order of CAB's causal-form curvature tiles (symmetric graph) at
Gemma-3-270M's shapes (32k, H=4, Hkv=1 expanded, D=256, bf16, 16-token blocks), on a
512-key window's bands and on a causal layer: i - j descending (the directed graph's
order, which the symmetric graph took up to dd1dafb) against the last rows first
(``kernels.curvature._lower_tiles``' order for the symmetric graph). The profiler's GPU
time of the curvature kernel alone and of every kernel of ``cab_scores``, per call.
Run from the repository root:
PYTHONPATH=src python benchmarks_ref/curvature_tile_order_h100.py 32768"""

import sys

import torch
from _events import kernel_ms

from attnlab.kernels import cab, curvature

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
dev, H, BS = "cuda", 4, 16
torch.manual_seed(0)
q = torch.randn(1, H, T, 256, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 1, T, 256, device=dev, dtype=torch.bfloat16).expand(1, H, T, 256)
blocks = torch.arange(T // BS, device=dev)
window_first = ((blocks * BS - 511).clamp(min=0) // BS).to(torch.int32)
tiles = curvature._lower_tiles


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
for first, shape in ((window_first, "window"), (None, "causal")):
    scores = {}
    for name, graph in (("i-j desc", "directed"), ("rows desc", "symmetric")):
        # the symmetric graph's tiles launched in the given graph's order
        curvature._lower_tiles = lambda n, device, _, g=graph: tiles(n, device, g)

        def call(first=first):
            return cab.cab_scores(q, k, BS, 0.0625, "causal", first=first)

        scores[name] = call()
        print(
            f"cab curvature {shape} {name}: {kernel_ms(call, 'curvature', 10):.3f} ms kernel,"
            f" whole cab_scores {kernel_ms(call, '', 10):.3f} ms",
            flush=True,
        )
    curvature._lower_tiles = tiles
    same = torch.equal(scores["i-j desc"], scores["rows desc"])
    print(f"cab curvature {shape}: the same scores in both orders: {same}", flush=True)
