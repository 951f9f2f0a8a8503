"""The window layers' whole rows in the real model's prefill (Gemma-3-270M, the long-context
study's 32k prompt; quest, coarse magnitude and CAB at 90/95%), side by side in rounds with
full attention (bench.timing.median_ms_rounds): the rows apart, sliced (``flex.
_whole_rows_apart`` as at 34881bf); the same with a prefix-closed policy's rows before them
chosen alone ("whole rows"; a path of 21f2a66 not kept after this run: it sets
``prefix_closed``, which nothing reads without it); the previous form patched in (two calls
over every row, outputs added, as at 512d0aa); tiles of the block. Also the last logits of
the forms against each other. From the repository root, after
``snakemake results/niah/gemma3-270m/prompts.parquet --profile profiles/gpu
--configfile=configs/long_context.yaml``:
PYTHONPATH=src python benchmarks_ref/whole_rows_forms_h100.py results/niah/gemma3-270m/prompts.parquet
CPU smoke test (tiny Gemma 3): PYTHONPATH=src:. python benchmarks_ref/whole_rows_forms_h100.py --tiny"""

import sys

import torch
from torch.nn.attention.flex_attention import BlockMask

from attnlab import decoding, flex, policies, sparse, windows
from attnlab.bench.timing import median_ms_rounds

tiny = "--tiny" in sys.argv
if tiny:
    from tests.tiny_models import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(0, 100, (1, 384), generator=torch.Generator().manual_seed(11))
    names, sparsities, W = ["quest", "coarse_magnitude"], [0.8], 24
else:
    from attnlab import models
    from attnlab.bench.prefill import prompt_ids

    model = models.load("gemma3-270m", device="cuda", dtype="auto")[0]
    from attnlab import attention

    model = attention.install(model)
    ids = prompt_ids(sys.argv[1], 32768, model.device)
    names, sparsities, W = ["quest", "coarse_magnitude", "cab"], [0.9, 0.95], 512
dev, T = model.device, ids.shape[-1]
stash, state = {}, {"old": False}
rows_of = windows.rows_of


def keep_blocks(blocks, r, k0, mask_mod):  # the model's whole BlockMask, for the old form
    stash["blocks"] = blocks
    return rows_of(blocks, r, k0, mask_mod)


windows.rows_of = keep_blocks
new_apart = flex._whole_rows_apart


def old_apart(q, k, v, keep, block_size, scaling, mask_mod, lists, whole):
    if not state["old"]:
        return new_apart(q, k, v, keep, block_size, scaling, mask_mod, lists, whole)
    model_mask = stash["blocks"]
    visible = (windows.window_block_pairs(T, block_size, W, q.device) > 0).sum(-1, dtype=torch.int32)
    num, idx = (flex.keep_lists(keep, all_partial=True) if lists is None else lists)[2:]
    per = model_mask.BLOCK_SIZE[0] // block_size
    b, h, m = num.shape
    tiles = (num >= visible).view(b, h, m // per, per).all(-1)
    rest = torch.where(tiles.repeat_interleave(per, -1), 0, num)
    part = flex.block_mask_from_lists((None, None, rest, idx), block_size, q.shape[-2], mask_mod)
    out = flex.run_flex(q, k, v, part, scaling, flex.kernel_options(block_size, block_size))

    def rows(n, i):
        return (None, None) if n is None else (n * tiles, i.expand(b, h, -1, -1).contiguous())

    dense = BlockMask.from_kv_blocks(
        *rows(model_mask.kv_num_blocks, model_mask.kv_indices),
        *rows(model_mask.full_kv_num_blocks, model_mask.full_kv_indices),
        BLOCK_SIZE=model_mask.BLOCK_SIZE,
        mask_mod=model_mask.mask_mod,
        seq_lengths=model_mask.seq_lengths,
        compute_q_blocks=False,
    )
    return out + flex.run_flex(q, k, v, dense, scaling)


flex._whole_rows_apart = old_apart


def prefill(policy, s, tiles="auto", old=False, logits=False, alone=True):
    def fn():
        state["old"] = old
        policy.prefix_closed = getattr(type(policy), "prefix_closed", 0) and alone and not old
        r = sparse.SparseRun(policy, s, regime="prefill", whole_prompt=True, records=False,
                             tiles=tiles, backend="flex")  # fmt: skip
        if logits:
            with r, torch.no_grad():
                return model(input_ids=ids).logits[0, -1].float()
        decoding.prefill(model, ids, r)
        return r

    return fn


full = prefill(policies.make("full"), 0.0)
print(torch.__version__, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", flush=True)
for name in names:
    policy = policies.make(name, block_size=16) if tiny else policies.make(name)
    for s in sparsities:
        a, b = prefill(policy, s, logits=True)(), prefill(policy, s, old=True, logits=True)()
        diff = (a - b).abs().max().item()
        c = prefill(policy, s, logits=True, alone=False)()
        diff2 = (a - c).abs().max().item()
        fns = [full, prefill(policy, s), prefill(policy, s, alone=False),
               prefill(policy, s, old=True), prefill(policy, s, "block")]  # fmt: skip
        rep_ms, min_reps = (1.0, 2) if tiny else (3000.0, 10)
        (f, n), (w, _), (wa, _), (o, _), (bl, _) = median_ms_rounds(fns, dev.type, rep_ms, min_reps, 50)
        print(f"{name} {s}: full {f:.2f} | whole rows {w:.2f} | whole rows, every row chosen"
              f" {wa:.2f} | previous form {o:.2f} | tiles of the block {bl:.2f} ms ({n} rounds;"
              f" last logits max diff {diff:.1e} previous, {diff2:.1e} every row chosen)",
              flush=True)  # fmt: skip
