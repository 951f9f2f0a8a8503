"""Microbench: a window layer's selection at Gemma-3-270M's shapes (32k, H=4, Hkv=1, D=256,
bf16, a 512-key window, 16-token blocks), each row's budget (1 - s)(t + 1) keys over
random scores, the blocks of rows whose budget holds their window all kept: FlexAttention
in tiles of the block against the whole rows apart (flex_block_sparse_attention's
``whole``: the rows from r, those of the last query tiles whose every block keeps all it
sees, as the model's 128-row BlockMask; the rows before r in tiles of the block), and the
dense window. Run from the repository root:
PYTHONPATH=src python benchmarks_ref/window_whole_tiles_h100.py 32768"""

import sys

import torch
from _events import median_event_ms
from torch.nn.attention.flex_attention import create_block_mask

from attnlab import flex
from attnlab.policies.base import row_budget
from attnlab.windows import (
    rows_of,
    whole_from,
    window_block_pairs,
    window_mask_mod,
)

dev, T, H, D, BS, W = "cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 32768, 4, 256, 16, 512
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16)
sc = D**-0.5
mm = window_mask_mod(W)
model = create_block_mask(mm, 1, None, T, T, device=dev)


pairs = window_block_pairs(T, BS, W, dev)
seen = pairs > 0
m = T // BS
starts = torch.arange(0, T, BS, device=dev)
ends = starts + BS - 1
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
print(
    "dense window %.3f ms" % median_event_ms(lambda: flex.run_flex(q, k, v, model, sc)), flush=True
)
for s in (0.9, 0.95, 0.99):
    budget = row_budget(ends + 1, s)  # keys
    score = torch.rand(1, H, m, m, device=dev).masked_fill(~seen, -1)
    order = score.argsort(-1, descending=True)
    cnt = torch.gather((pairs > 0).expand(1, H, m, m) * BS, -1, order)
    fits = cnt.cumsum(-1) <= budget[None, None, :, None]
    keep = torch.zeros(1, H, m, m, dtype=torch.bool, device=dev).scatter_(-1, order, fits) & seen
    keep |= torch.eye(m, dtype=torch.bool, device=dev)
    full = (ends - (starts - W + 1).clamp(min=0) + 1) <= budget
    keep[:, :, full] = seen[full]
    lists = (None, None, *flex.ordered_blocks(keep.tril()))
    a = median_event_ms(lambda: flex.flex_block_sparse_attention(q, k, v, keep, BS, sc, mm, lists))
    r = whole_from(T, BS, W, s, 128)
    if r >= T:
        print(f"s={s}: blocks {a:.3f} ms | no whole rows", flush=True)
        continue
    k0 = max(0, r - W + 1) // 128 * 128
    whole = (r, k0, rows_of(model, r, k0, window_mask_mod(W, r, k0)))
    b = median_event_ms(
        lambda: flex.flex_block_sparse_attention(q, k, v, keep, BS, sc, mm, lists, whole=whole)
    )
    o1 = flex.flex_block_sparse_attention(q, k, v, keep, BS, sc, mm, lists)
    o2 = flex.flex_block_sparse_attention(q, k, v, keep, BS, sc, mm, lists, whole=whole)
    print(
        f"s={s}: blocks {a:.3f} ms | whole rows apart {b:.3f} ms (from row {r} of {T},"
        f" max diff {(o1 - o2).abs().max().item():.1e})",
        flush=True,
    )
