"""Microbench: one window layer of Quest's prefill at Gemma-3-270M's shapes (32k, H=4,
Hkv=1, D=256, bf16, a 512-key window, 16-token blocks) through
``SparseRun.flex_attention``, its selection included (the fused kernel), then the
(B, T, H, D) copy the model makes of the output: the rows before the whole rows chosen
alone (``prefix_closed``, a path of 21f2a66 not kept after this run: without it, that form
is every row chosen) against every row chosen, the output stacked in (B, H, T, D) (one
copy more, as a stacked output costs) and tiles of the block, beside the dense window
under the model's BlockMask. Each a second layer under the same mask (what every
layer after the first pays). Run from the repository root:
PYTHONPATH=src python benchmarks_ref/window_layer_selection_h100.py 32768"""

import sys

import torch
from _events import median_event_ms
from transformers.masking_utils import sliding_window_causal_mask_function

from attnlab import flex, policies, sparse
from attnlab.masks import ModelMask

dev, T, H, D = "cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 32768, 4, 256
W = int(sys.argv[2]) if len(sys.argv) > 2 else 512
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(1, 1, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
sc = D**-0.5
mask = ModelMask(
    dict(
        batch_size=1, q_length=T, kv_length=T, q_offset=0, kv_offset=0, local_size=W,
        attention_mask=None, mask_function=sliding_window_causal_mask_function(W),
        device=torch.device(dev),
    )
)  # fmt: skip
print(torch.__version__, torch.cuda.get_device_name(), flush=True)
dense = mask.block_mask(dev)
ms = median_event_ms(lambda: flex.run_flex(q, k, v, dense, sc).transpose(1, 2).contiguous())
print(f"dense window {ms:.3f} ms", flush=True)
apart = flex._whole_rows_apart


def stacked(*args):
    return apart(*args).contiguous()


for s in (0.9, 0.95):
    times, outs = {}, {}
    for form in ("chosen alone", "every row chosen", "stacked output", "tiles of the block"):
        quest = policies.make("quest")
        quest.prefix_closed = form in ("chosen alone", "stacked output")
        flex._whole_rows_apart = stacked if form == "stacked output" else apart
        tiles = "block" if form == "tiles of the block" else "auto"
        run = sparse.SparseRun(quest, s, records=False, tiles=tiles)

        def layer(run=run):
            return run.flex_attention(1, q, k, v, sc, mask).transpose(1, 2).contiguous()

        times[form], outs[form] = median_event_ms(layer), layer()
        flex._whole_rows_apart = apart
    diff = max((o - outs["chosen alone"]).abs().max().item() for o in outs.values())
    print(
        f"s={s}: " + " | ".join(f"{f} {t:.3f} ms" for f, t in times.items()),
        f"(max diff {diff:.1e}; {list(run.kernels)[0]} for tiles of the block)",
        flush=True,
    )
