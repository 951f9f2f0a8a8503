"""Microbench: a 16-token block selection run by flex with 16x16 tiles (as now) against
coarser BlockMask blocks whose mask_mod looks the fine selection up (same token pairs).
Gemma-3-270M's attention shapes at 32k: H=4, Hkv=1, D=256, bf16; causal and 512-window."""

import sys
import time

import torch
from _events import median_event_ms
from torch.nn.attention.flex_attention import BlockMask, flex_attention

for name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, name):
        setattr(torch._dynamo.config, name, 256)
flex = torch.compile(flex_attention, dynamic=False)
import os
dev = os.environ.get("DEV", "cuda")
T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
FB = int(sys.argv[2]) if len(sys.argv) > 2 else 16
H, HKV, D, W = 4, 1, 256, 512
torch.manual_seed(0)
q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, HKV, T, D, device=dev, dtype=torch.bfloat16)
M = T // FB


def lists(keep):
    num = keep.sum(-1, dtype=torch.int32)
    idx = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def selection(sparsity, mix, window):
    """(1, H, M, M) bool: per row budget (1-s)(t+1) keys in 16-blocks, scores = shared
    column importance * mix + noise * (1 - mix) + recency; block 0 and diagonal kept."""
    g = torch.Generator(device=dev).manual_seed(1)
    col = torch.randn(1, H, 1, M, device=dev, generator=g)
    noise = torch.randn(1, H, M, M, device=dev, generator=g)
    i = torch.arange(M, device=dev)
    s = mix * col + (1 - mix) * noise
    s = s + 2.0 * ((i[:, None] - i[None, :]) < 4)
    lo = (i[None, :] * FB + FB - 1) >= (i[:, None] * FB - (W - 1)) if window else True
    vis = (i[None, :] <= i[:, None]) & lo
    s = s.masked_fill(~vis, float("-inf"))
    s[..., 0] = float("inf")
    s[..., i, i] = float("inf")
    budget = ((1 - sparsity) * (i * FB + FB)).ceil().div(FB).ceil().clamp(min=2).long()
    order = s.argsort(-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(M, device=dev).expand_as(order))
    return (rank < budget[:, None]) & vis


def fine_mask(keep, window):
    n, idx = lists(keep)
    if window:
        mm = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W)  # noqa: E731
        return BlockMask.from_kv_blocks(n, idx, None, None, BLOCK_SIZE=FB, mask_mod=mm,
                                        seq_lengths=(T, T), compute_q_blocks=False)
    i = torch.arange(M, device=dev)
    below = i[None, :] < i[:, None]
    fn, fi = lists(keep & below)
    pn, pi = lists(keep & ~below)
    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=FB,
                                    mask_mod=lambda b, h, qi, ki: qi >= ki,
                                    seq_lengths=(T, T), compute_q_blocks=False)


def coarse_mask(keep, qb, kb, window, use_full):
    r, c = qb // FB, kb // FB
    mq, mk = M // r, M // c
    k6 = keep.view(1, H, mq, r, mk, c)
    anyk = k6.any(5).any(3)
    if window:
        def mm(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W) & keep[b, h, qi // FB, ki // FB]
    else:
        def mm(b, h, qi, ki):
            return (qi >= ki) & keep[b, h, qi // FB, ki // FB]
    if use_full and not window:
        iq = torch.arange(mq, device=dev) * qb
        ik = torch.arange(mk, device=dev) * kb
        strictly = (ik[None, :] + kb - 1) < iq[:, None]
        full = k6.all(5).all(3) & strictly
        fn, fi = lists(full)
        pn, pi = lists(anyk & ~full)
    else:
        fn = fi = None
        pn, pi = lists(anyk)
    bm = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(qb, kb), mask_mod=mm,
                                  seq_lengths=(T, T), compute_q_blocks=False)
    dens = (anyk.float().sum() / (mq * (mq + 1) / 2 * r / c * H)).item() if not window else 0
    return bm, dens


def run(bm, opts):
    return flex(q, k, v, block_mask=bm, scale=D**-0.5, enable_gqa=True, kernel_options=opts)


print(torch.__version__, torch.cuda.get_device_name(), "T", T, flush=True)
sdpa_k = k.expand(1, H, T, D)
sdpa_v = v.expand(1, H, T, D)
print("sdpa causal %.3f ms" % median_event_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
    q, sdpa_k, sdpa_v, is_causal=True)), flush=True)
full = torch.ones(1, 1, M, M, dtype=torch.bool, device=dev).tril()
for window in (False, True):
    kind = "window" if window else "causal"
    # dense reference through flex at 128
    dk = torch.ones(1, 1, T // 128, T // 128, dtype=torch.bool, device=dev).tril()
    if window:
        i = torch.arange(T // 128, device=dev)
        dk &= (i[:, None] - i[None, :]) <= W // 128
    n_, i_ = lists(dk)
    mm0 = (lambda b, h, qi, ki: (qi >= ki) & (qi - ki < W)) if window else (
        lambda b, h, qi, ki: qi >= ki)
    bm0 = BlockMask.from_kv_blocks(n_, i_, None, None, BLOCK_SIZE=128, mask_mod=mm0,
                                   seq_lengths=(T, T), compute_q_blocks=False)
    print(f"{kind} dense flex128 {median_event_ms(lambda: run(bm0, None)):.3f} ms", flush=True)
    for sp in (0.9, 0.95, 0.99):
        for mix in (0.8, 0.2):
            keep = selection(sp, mix, window)
            ref = None
            bm = fine_mask(keep, window)
            fo = {"BLOCK_M": FB, "BLOCK_N": FB}
            out = run(bm, fo)
            t16 = median_event_ms(lambda: run(bm, fo))
            ref = out.float()
            line = f"{kind} s={sp} mix={mix} fine{FB} {t16:.3f}"
            for qb, kb in [t for t in ((128, 64), (64, 64), (128, 32), (64, 32), (128, 16), (64, 16)) if t[0] >= FB and t[1] >= FB and t != (FB, FB)]:
                for use_full in ((False, True) if not window and (qb, kb) == (128, 64) else (False,)):
                    try:
                        t0 = time.time()
                        bm2, dens = coarse_mask(keep, qb, kb, window, use_full)
                        torch.cuda.synchronize()
                        build = time.time() - t0
                        opts = {"BLOCK_M": qb, "BLOCK_N": kb}
                        if (qb, kb) == (128, 64):
                            opts = None
                        out2 = run(bm2, opts)
                        err = (out2.float() - ref).abs().max().item()
                        tt = median_event_ms(lambda: run(bm2, opts))
                        line += f" | {qb}x{kb}{'F' if use_full else ''} {tt:.3f} (d{dens:.3f} e{err:.1e})"
                    except Exception as e:  # noqa: BLE001
                        line += f" | {qb}x{kb} ERR {type(e).__name__}: {str(e)[:80]}"
            print(line, flush=True)
