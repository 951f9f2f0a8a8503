"""Check and microbench: the squared norms by which max-L2 coarsening ranks a block's tokens
on CUDA, from the Triton kernel (``kernels.coarsen.squared_norms``, what the scoring path
reads) against PyTorch's ``x.float().pow(2).sum(-1)`` (the reference's off CUDA).

Check: on every prompt of a prompts table (the long-context study's 15), every layer of
Gemma-3-270M, its post-RoPE queries and keys as attnlab's attention sees them, blocks of
16 and 64 tokens: the representatives (``reference.coarsen_max_l2``) and the prefix
representatives of every row (``reference.prefix_max_l2_index``, the cache regime's own
block) from either norm, counted where they differ. Timing: the coarsening of one layer's
queries (4 heads) and its one key head expanded, at the prompt's length, medians of 30
CUDA-event timings. Run as:

cd benchmarks_ref && PYTHONPATH=../src python coarsen_norms_h100.py \
    ../results/niah/gemma3-270m/prompts.parquet
"""

import sys

import torch
from _events import median_event_ms

from attnlab import attention, capture, hooks, models, niah
from attnlab.kernels import reference

torch_norms = lambda x: x.float().pow(2).sum(-1)  # noqa: E731
kernel_norms = reference.squared_norms


def with_norms(norms, fn, *args):
    reference.squared_norms = norms
    try:
        return fn(*args)
    finally:
        reference.squared_norms = kernel_norms


model, _, _ = models.load("gemma3-270m", device="cuda", dtype="auto")
model = attention.install(model)
layers = list(range(len(hooks.decoder_layers(model))))
prompts = niah.read_prompts(sys.argv[1])
print(torch.__version__, torch.cuda.get_device_name(), f"{len(prompts)} prompts")
differ = {16: [0, 0, 0], 64: [0, 0, 0]}  # blocks, prefix rows, compared
for p in prompts:
    store: dict = {}
    ids = torch.tensor([p.input_ids], device="cuda")
    with torch.inference_mode(), capture._rope_tap(model, layers, store):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    for layer in layers:
        _, _, q, k = store[layer]
        for x in (q, k):
            for bs, d in differ.items():
                for i, fn in enumerate((reference.coarsen_max_l2, reference.prefix_max_l2_index)):
                    new, old = fn(x, bs), with_norms(torch_norms, fn, x, bs)
                    diff = (new != old).any(-1) if new.dim() == 4 else new != old
                    d[i] += int(diff.sum())
                d[2] += x.shape[1] * -(-x.shape[2] // bs)
    print(f"length {p.length} depth {p.depth}: blocks differing so far {differ}", flush=True)
for bs, (blocks, rows, n) in differ.items():
    print(f"block {bs}: representatives differing {blocks} of {n} blocks; prefix rows {rows}")

t = prompts[-1].length
q = torch.randn(1, t, 4, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(1, 1, t, 256, device="cuda", dtype=torch.bfloat16).expand(1, 4, t, 256)
for name, x in (("q", q), ("k expanded", k)):
    for label, norms in (("PyTorch norms", torch_norms), ("kernel norms", kernel_norms)):
        ms = median_event_ms(lambda x=x, n=norms: with_norms(n, reference.coarsen_max_l2, x, 16))
        print(f"coarsen {name} T={t} block 16, {label}: {ms:.3f} ms")
