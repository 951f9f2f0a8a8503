"""Microbench: CAB's scores of one window layer (the scored path, ``cab_scores``: float32
A, ieee products) at Gemma-3-270M's shapes (32k tokens, bf16 Q and K, H=4 query heads of
one key head, D=256, 16-token blocks, a 512-key window: each query block's band is its 33
last key blocks) in the curvature tiles of ``cab_select(band_block=...)``: 128 (the
tiles outside a window, what a window layer took before ``band_block``), 64, 32 and 16;
beside a causal layer's scores (no band). ``band_block`` sets the prompt form's tiles
(the causal form's lines show its own tiles whatever the value; see the output's header
for the commit where it set both). Each case counts the pairs of a band's scores
whose order differs from the 128 tiles' scores (the entries of a band are the same
products; the per-row z-score moves with the skipped tiles). Output and the commit that
made it: curvature_band_tiles_h100.txt. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/curvature_band_tiles_h100.py 32768"""

import sys

import torch
from _events import median_event_ms

from attnlab.kernels.cab import cab_scores

dev, T, H, D, BS, W = "cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 32768, 4, 256, 16, 512
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)  # the model's dtype
k = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
k = k.expand(-1, H, -1, -1)  # as the fused path hands it
m = T // BS
blocks = torch.arange(m, device=dev)
first = ((blocks * BS - W + 1).clamp(min=0) // BS).int()  # a block's first row's window edge
band = (blocks[None, :] >= first[:, None]) & (blocks[None, :] <= blocks[:, None])  # (M, M)
print(torch.__version__, torch.cuda.get_device_name(), flush=True)


def scores(form, tile, first=first, graph="symmetric"):
    import attnlab.kernels.cab as cab

    real = cab.cab_select

    def with_tile(*args, **kw):
        return real(*args, band_block=tile, **kw)

    cab.cab_select = with_tile
    try:
        return cab_scores(q, k, BS, D**-0.5, form, graph=graph, first=first)
    finally:
        cab.cab_select = real


for graph in ("symmetric", "directed"):
    for form in ("prompt", "causal"):
        whole = median_event_ms(lambda f=form, g=graph: scores(f, 128, None, g), reps=10)
        ref = scores(form, 128, graph=graph).masked_fill(~band, -torch.inf)
        order = ref.argsort(dim=-1, descending=True, stable=True)
        row = []
        for tile in (128, 64, 32, 16):
            ms = median_event_ms(lambda f=form, t=tile, g=graph: scores(f, t, graph=g), reps=10)
            got = scores(form, tile, graph=graph).masked_fill(~band, -torch.inf)
            ranked = got.gather(-1, order)[..., : band.sum(-1).max()]  # the band, ref order
            kept = ranked.isfinite()
            rises = (ranked[..., 1:] > ranked[..., :-1]) & kept[..., 1:]
            row.append(f"{tile}: {ms:.3f} ms ({int(rises.sum())} order swaps)")
        print(f"{graph} {form}: causal layer {whole:.3f} ms | window " + " | ".join(row))
