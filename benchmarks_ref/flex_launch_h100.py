"""Microbench: FlexAttention's launch settings at Gemma-3-270M's shapes (32k, H=4, Hkv=1,
D=256, bf16): a causal block-sparse layer of 16-token blocks (a random selection of each
query block's diagonal and (1 - s) of its causal blocks, at 95% and 99%) in 16 x 16 tiles
at 1, 2 and 4 warps (4, 3 stages: flex's default, attnlab's before
``flex.SMALL_TILE_WARPS``) and 2-4 stages; the dense 512-key sliding window in 128-token
blocks (full attention's window layers) and block-sparse layers of 64- and 128-token
blocks (cab_b64's, XAttention's) in their tiles (flex's default for D = 256: 64 x 32, 3
stages, 4 warps) against other tiles and stages. The profiler's GPU time per call and
each output's largest difference from the first setting's. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/flex_launch_h100.py 32768"""

import sys

import torch
from _events import kernel_ms
from torch.nn.attention.flex_attention import create_block_mask

from attnlab.flex import block_mask_from_keep, run_flex
from attnlab.windows import window_mask_mod

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
H, HKV, D, W, dev = 4, 1, 256, 512, "cuda"
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))


def random_keep(s: float, bs: int) -> torch.Tensor:
    """Each query block's diagonal and (1 - s) of its causal blocks (at least one), at random."""
    m = T // bs
    i = torch.arange(m, device=dev)
    budget = ((1 - s) * (i + 1)).ceil().long().clamp(min=1)
    r = torch.rand(1, H, m, m, device=dev)
    r = torch.where(i[None, :] <= i[:, None], r, -1.0)
    r = torch.where(i[None, :] == i[:, None], 2.0, r)
    return r.argsort(-1, descending=True).argsort(-1) < budget[:, None]


def sweep(label: str, mask, settings) -> None:
    ref = None
    for opts in settings:
        out = run_flex(q, k, v, mask, D**-0.5, opts)
        ref = out if ref is None else ref
        diff = (out.float() - ref.float()).abs().max().item()
        ms = kernel_ms(lambda o=opts: run_flex(q, k, v, mask, D**-0.5, o), "", 10)
        print(f"{label} {opts}: {ms:.3f} ms kernel, max diff {diff:.2e}", flush=True)


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
tile = dict(BLOCK_M=16, BLOCK_N=16)
small = [dict(tile, num_warps=w, num_stages=st) for w, st in ((4, 3), (1, 3), (2, 2), (2, 3))]
small += [dict(tile, num_warps=2, num_stages=4), dict(tile, num_warps=4, num_stages=2)]
for s in (0.95, 0.99):
    sweep(f"causal 16x16 s={s}", block_mask_from_keep(random_keep(s, 16), 16, T), small)
window = create_block_mask(window_mask_mod(W), 1, 1, T, T, device=dev, BLOCK_SIZE=128)
dense = [None, dict(num_stages=2), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)]
dense += [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)]
sweep("window 128", window, dense)
for bs in (64, 128):
    tile = dict(BLOCK_M=64, BLOCK_N=64) if bs == 64 else {}
    wide = [tile or None, dict(tile, num_stages=2), dict(tile, num_warps=8)]
    for s in (0.95, 0.99):
        sweep(f"causal {bs}x{bs} s={s}", block_mask_from_keep(random_keep(s, bs), bs, T), wide)
