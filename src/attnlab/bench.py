"""Kernel benchmark: the CAB predictor and block-sparse attention against dense attention.

``python -m attnlab.bench kernels`` times, side by side in one process and on the same
inputs, dense causal attention (SDPA flash, SDPA cuDNN, flex) and CAB (the Triton
predictor alone, and predictor + BlockMask + flex block-sparse attention at each sparsity),
for B = 1, H = 32, D = 128, bf16 and N from 16k to 128k. It checks the kernels against
their references on the GPU first, then writes a table (CSV always, Parquet when pyarrow
imports) and ``figs/kernel_speed.png``. Without CUDA it runs a small-N CPU variant with the
PyTorch predictor and eager flex, so the pipeline runs everywhere.
``python -m attnlab.bench predictor`` times the predictor's stages and tile choices.

Needs only torch (and triton on CUDA); matplotlib for the figure, pyarrow for Parquet.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

GPU_LENGTHS = (16384, 32768, 65536, 131072)
CPU_LENGTHS = (512, 1024)


@dataclass
class KernelBench:
    """One benchmark setting; every field is also a column of the table."""

    lengths: tuple[int, ...] = GPU_LENGTHS
    batch: int = 1
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    dtype: str = "bfloat16"
    block_size: int = 64  # CAB score blocks (tokens)
    q_group: int = 2  # score rows pooled per selected query block: 2 x 64 = 128 tokens
    sparsities: tuple[float, ...] = (0.90, 0.95, 0.99)
    lam: float = 1.0
    adjacency: str = "softmax"
    graph: str = "directed"
    sink_blocks: int = 1
    precision: str = "bf16"  # of A and A @ A in the Triton predictor
    adjacency_block_m: int = 64
    adjacency_block_n: int = 64
    adjacency_warps: int = 4
    curvature_block: int = 128
    select_warps: int = 4
    rep_ms: float = 400.0  # time budget per method and length; at least min_reps runs
    min_reps: int = 5
    seed: int = 0
    reference_predictor: bool = True  # also time the plain-PyTorch predictor
    methods: tuple[str, ...] = field(default=())  # empty: all


# ---------------------------------------------------------------------------- timing


def median_ms(
    fn, device: str, rep_ms: float, min_reps: int, max_reps: int = 100
) -> tuple[float, int]:
    """Median wall time of fn() in ms, after two warm-up calls (compilation included there).

    On CUDA each run is bracketed by events and preceded by a write of 256 MiB so that no
    run finds its inputs in L2 from the one before.
    """
    cuda = device == "cuda"
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
        flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
    else:
        t0 = time.perf_counter()
        fn()
    estimate = (time.perf_counter() - t0) * 1e3
    reps = max(min_reps, min(max_reps, int(rep_ms / max(estimate, 1e-3))))
    times = []
    for _ in range(reps):
        if cuda:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in times]
    return statistics.median(times), reps


# ---------------------------------------------------------------------------- budgets


def keep_per_query_block(m: int, q_group: int, sparsity: float) -> torch.Tensor:
    """Key blocks kept per query block: (1 - s) of the causal key blocks it sees, at least 1.

    (Mg,) int, Mg = ceil(m / q_group); must-keep blocks count toward it.
    """
    seen = ((torch.arange(-(-m // q_group)) + 1) * q_group).clamp(max=m)
    return ((1.0 - sparsity) * seen).round().clamp(min=1).to(torch.int32)


def must_keep_blocks(m: int, q_group: int, sink_blocks: int) -> torch.Tensor:
    """(Mg, m) bool: the first ``sink_blocks`` key blocks and each query block's own blocks."""
    mg = -(-m // q_group)
    must = torch.zeros(mg, m, dtype=torch.bool)
    must[:, :sink_blocks] = True
    for r in range(q_group):
        cols = (torch.arange(mg) * q_group + r).clamp(max=m - 1)
        must[torch.arange(mg), cols] = True
    return must


def kept_pairs(selection, kv_block: int, n: int) -> float:
    """Causal (query, key) token pairs the selection attends, summed over batch and heads."""
    q_block = selection.q_group * kv_block
    full = selection.full_num.double().sum().item() * q_block * kv_block
    # a partial block r key blocks past the query block's first one
    qpos = torch.arange(q_block, dtype=torch.float64)
    pairs_at = [
        (qpos - r * kv_block + 1).clamp(0, kv_block).sum().item() for r in range(selection.q_group)
    ]
    mg = selection.partial_num.shape[-1]
    first = (torch.arange(mg, device=selection.partial_idx.device) * selection.q_group).view(
        1, 1, mg, 1
    )
    cols = torch.arange(selection.partial_idx.shape[-1], device=first.device).view(1, 1, 1, -1)
    valid = cols < selection.partial_num.unsqueeze(-1)
    offset = (selection.partial_idx.long() - first).masked_fill(~valid, -1)
    part = sum(((offset == r).sum().item() * pairs_at[r]) for r in range(selection.q_group))
    return full + part


# ---------------------------------------------------------------------------- methods


def _sdpa(backend):
    """Causal SDPA forced onto one backend (None: PyTorch's choice)."""
    import contextlib

    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, scaling):
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
            )

    return run


def _torch_selection(q, k, cfg: KernelBench, keep, must, scaling):
    """The plain-PyTorch predictor, with its selection as flex block lists."""
    from attnlab.kernels import reference as ref

    score = ref.cab_block_scores(q, k, cfg.block_size, scaling, cfg.lam, cfg.adjacency, cfg.graph)
    mask = ref.select_blocks_grouped(score, keep, cfg.q_group, must)  # (B, H, Mg, M)
    mg, m = mask.shape[-2:]
    first = (torch.arange(mg, device=mask.device) * cfg.q_group)[:, None]
    cols = torch.arange(m, device=mask.device)[None, :]
    lists = {}
    for name, part in (("full", mask & (cols < first)), ("partial", mask & (cols >= first))):
        lists[f"{name}_num"] = part.sum(-1, dtype=torch.int32)
        order = part.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        lists[f"{name}_idx"] = order.to(torch.int32)
    return SimpleNamespace(q_group=cfg.q_group, mask=mask, score=score, **lists)


def _gpu_selection(q, k, cfg: KernelBench, keep, must, scaling, **kw):
    from attnlab.kernels.cab import cab_select

    return cab_select(
        q, k, cfg.block_size, scaling, keep, lam=cfg.lam, adjacency=cfg.adjacency,
        graph=cfg.graph, must_keep=must, q_group=cfg.q_group, precision=cfg.precision,
        adjacency_blocks=(cfg.adjacency_block_m, cfg.adjacency_block_n),
        adjacency_warps=cfg.adjacency_warps,
        curvature_block=cfg.curvature_block, select_warps=cfg.select_warps, **kw,
    )  # fmt: skip


def _row(
    device,
    method,
    n,
    ms,
    reps,
    sparsity=float("nan"),
    density=float("nan"),
    flops=float("nan"),
    dense_flops=float("nan"),
    status="ok",
):
    return {
        "method": method,
        "n": n,
        "sparsity_target": sparsity,
        "density": density,
        "ms": ms,
        "reps": reps,
        "tflops": flops / ms / 1e9 if ms == ms else float("nan"),
        "tflops_effective": dense_flops / ms / 1e9 if ms == ms else float("nan"),
        "status": status,
        "device": device,
    }


def run_kernel_bench(cfg: KernelBench, log=print, on_length=None) -> list[dict]:
    """Time every method at every length; one row per (method, length, sparsity).

    ``on_length(rows)`` is called with the rows so far after each length.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = []
    for n in cfg.lengths:
        log(f"N = {n}")
        rows += _bench_length(cfg, n, device, gen, log)
        if device == "cuda":
            torch.cuda.empty_cache()
        _add_speedups(rows)
        if on_length is not None:
            on_length(rows)
    return rows


def _bench_length(cfg: KernelBench, n: int, device: str, gen, log) -> list[dict]:
    from attnlab.flex import causal_block_mask, flex_attention_from_selection, run_flex

    dtype = getattr(torch, cfg.dtype)
    scaling = cfg.head_dim**-0.5
    q = torch.randn(
        cfg.batch, cfg.heads, n, cfg.head_dim, generator=gen, device=device, dtype=dtype
    )
    k, v = (
        torch.randn(
            cfg.batch, cfg.kv_heads, n, cfg.head_dim, generator=gen, device=device, dtype=dtype
        )
        for _ in range(2)
    )
    predictor = _gpu_selection if device == "cuda" else _torch_selection
    rows = []

    def timed(method, fn, **extra):
        if cfg.methods and not any(method.startswith(w) for w in cfg.methods):
            return
        try:
            ms, reps = median_ms(fn, device, cfg.rep_ms, cfg.min_reps)
            row = _row(device, method, n, ms, reps, **extra)
        except Exception as err:  # a backend that cannot run this shape is a row, not a crash
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            row = _row(device, method, n, float("nan"), 0, status=msg)
        rows.append(row)
        status = row["status"] if row["status"] != "ok" else ""
        eff = row["tflops_effective"]
        log(f"  {method:<24} {row['ms']:9.3f} ms {eff:7.1f} TFLOP/s effective  {status}")

    causal_pairs = cfg.batch * cfg.heads * n * (n + 1) / 2
    dense_flops = 4 * cfg.head_dim * causal_pairs
    dense = dict(flops=dense_flops, dense_flops=dense_flops, density=1.0)
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        flash, cudnn = _sdpa(SDPBackend.FLASH_ATTENTION), _sdpa(SDPBackend.CUDNN_ATTENTION)
        timed("sdpa_flash", lambda: flash(q, k, v, scaling), **dense)
        timed("sdpa_cudnn", lambda: cudnn(q, k, v, scaling), **dense)
    else:
        timed("sdpa", lambda: _sdpa(None)(q, k, v, scaling), **dense)
    causal = causal_block_mask(n, device)
    timed("flex_causal", lambda: run_flex(q, k, v, causal, scaling), **dense)

    m = -(-n // cfg.block_size)
    must = must_keep_blocks(m, cfg.q_group, cfg.sink_blocks).to(device)
    predictor_flops = 4 * cfg.head_dim * m * (m + 1) / 2 + 2 * m**3 / 6  # two sweeps, A @ A
    predictor_flops *= cfg.batch * cfg.heads
    s_max = max(cfg.sparsities)
    keep_max = keep_per_query_block(m, cfg.q_group, s_max).to(device)
    timed(
        "cab_predictor",
        lambda: predictor(q, k, cfg, keep_max, must, scaling),
        sparsity=s_max,
        flops=predictor_flops,
    )
    if device == "cuda" and cfg.reference_predictor:
        timed(
            "cab_predictor_torch",
            lambda: _torch_selection(q, k, cfg, keep_max, must, scaling),
            sparsity=s_max,
            flops=predictor_flops,
        )

    for s in cfg.sparsities:
        keep = keep_per_query_block(m, cfg.q_group, s).to(device)
        sel = predictor(q, k, cfg, keep, must, scaling)
        pairs = kept_pairs(sel, cfg.block_size, n)
        sparse = dict(
            sparsity=s,
            density=pairs / causal_pairs,
            flops=4 * cfg.head_dim * pairs,
            dense_flops=dense_flops,
        )

        def flex_only(sel=sel):
            return flex_attention_from_selection(q, k, v, sel, cfg.block_size, scaling)

        def end_to_end(keep=keep):
            chosen = predictor(q, k, cfg, keep, must, scaling)
            return flex_attention_from_selection(q, k, v, chosen, cfg.block_size, scaling)

        tag = f"s{round(s * 100)}"
        timed(f"cab_flex_{tag}", flex_only, **sparse)
        timed(f"cab_e2e_{tag}", end_to_end, **sparse)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """Ratio to cuDNN dense (the CPU's dense SDPA) at the same length, from the same run."""
    for row in rows:
        base = [
            r["ms"] for r in rows if r["n"] == row["n"] and r["method"] in ("sdpa_cudnn", "sdpa")
        ]
        ok = base and base[0] == base[0] and row["ms"] == row["ms"]
        row["speedup_vs_dense"] = base[0] / row["ms"] if ok else float("nan")


# ---------------------------------------------------------------------------- checks


def check_kernels_cuda(log=print) -> list[dict]:
    """Kernels against their references, and flex against eager masked attention, on CUDA."""
    from attnlab.flex import flex_attention_from_selection, flex_block_sparse_attention
    from attnlab.kernels import reference as ref
    from attnlab.kernels.cab import cab_select
    from attnlab.kernels.coarsen import coarsen_max_l2
    from attnlab.kernels.curvature import coarse_adjacency, forman_ricci
    from attnlab.kernels.select import select_blocks

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(1)
    results = []

    def record(name, err, tol, exact=False):
        ok = (err == 0) if exact else (err <= tol)
        results.append(
            {"check": name, "error": float(err), "tolerance": 0.0 if exact else tol, "ok": bool(ok)}
        )
        log(f"  check {name:<44} {'ok ' if ok else 'BAD'} error {float(err):.2e}")

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm().clamp(min=1e-30)).item()

    n, bs = 4096 + 37, 64  # ragged last block, GQA 8 -> 2
    q = torch.randn(1, 8, n, 128, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, n, 128, generator=gen, device=dev, dtype=torch.bfloat16)
    qc, kc = coarsen_max_l2(q, bs), coarsen_max_l2(k, bs)
    record(
        "coarsen bf16 == reference", (qc != ref.coarsen_max_l2(q, bs)).sum().item(), 0, exact=True
    )
    for adjacency in ("softmax", "scores"):
        a = coarse_adjacency(qc, kc, 128**-0.5, adjacency)
        record(
            f"adjacency {adjacency} rel",
            rel(a, ref.coarse_adjacency(qc, kc, 128**-0.5, adjacency)),
            1e-5,
        )
        for graph in ("directed", "symmetric"):
            for precision, tol in (("ieee", 1e-5), ("tf32", 3e-3), ("bf16", 1e-2)):
                f = forman_ricci(a, graph, precision)
                record(
                    f"forman {adjacency} {graph} {precision} rel",
                    rel(f, ref.forman_ricci(a, graph)),
                    tol,
                )
    m = qc.shape[2]
    score = torch.randn(2, 4, m, m, generator=gen, device=dev)
    score = score.masked_fill(~torch.ones(m, m, dtype=torch.bool, device=dev).tril(), float("-inf"))
    keep = torch.randint(0, 12, (m,), generator=gen, device=dev)
    record(
        "select_blocks == reference (mismatches)",
        (select_blocks(score, keep) != ref.select_blocks(score, keep)).sum().item(),
        0,
        exact=True,
    )
    for lam, adjacency, graph in ((1.0, "softmax", "directed"), (0.5, "scores", "symmetric")):
        g = 2
        mg = -(-m // g)
        keep_g = torch.full((mg,), 5, device=dev)
        must = must_keep_blocks(m, g, 1).to(dev)
        sel = cab_select(
            q,
            k,
            bs,
            128**-0.5,
            keep_g,
            lam=lam,
            adjacency=adjacency,
            graph=graph,
            must_keep=must,
            q_group=g,
            write_score=True,
            write_mask=True,
            precision="ieee",
        )
        expected = ref.cab_block_scores(q, k, bs, 128**-0.5, lam, adjacency, graph)
        fin = torch.isfinite(expected)
        record(f"cab scores {adjacency} {graph} ieee rel", rel(sel.score[fin], expected[fin]), 1e-4)
        own = ref.select_blocks_grouped(sel.score, keep_g, g, must)
        record(
            f"cab selection {graph} on own scores (mismatches)",
            (sel.mask != own).sum().item(),
            0,
            exact=True,
        )
        lists = torch.zeros(*sel.mask.shape[:-1], m + 1, dtype=torch.bool, device=dev)
        for num, idx in ((sel.full_num, sel.full_idx), (sel.partial_num, sel.partial_idx)):
            valid = torch.arange(m, device=dev) < num.unsqueeze(-1)
            lists.scatter_(-1, idx.long().masked_fill(~valid, m), True)  # column m: the unused tail
        lists = lists[..., :m]
        record(
            f"cab lists == mask {graph} (mismatches)",
            (lists != sel.mask).sum().item(),
            0,
            exact=True,
        )
        fast = cab_select(
            q, k, bs, 128**-0.5, keep_g, lam=lam, adjacency=adjacency, graph=graph,
            must_keep=must, q_group=g, write_score=True, write_mask=True, precision="bf16",
        )  # fmt: skip
        record(
            f"cab scores {adjacency} {graph} bf16 rel", rel(fast.score[fin], expected[fin]), 5e-2
        )
        changed = (fast.mask != sel.mask).sum().item() / (2 * sel.mask.sum().item())
        record(f"cab selection {graph} bf16 vs ieee (changed share)", changed, 0.05)

    # flex against an eager masked softmax on the same token mask, bf16 against float64
    def masked_reference(q, k, v, keep_tokens):
        grp = q.shape[1] // k.shape[1]
        kk, vv = (x.double().repeat_interleave(grp, 1) for x in (k, v))
        s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = torch.softmax(s.masked_fill(~keep_tokens, float("-inf")), -1).nan_to_num(0.0)
        return p @ vv

    n = 2048
    q = torch.randn(1, 8, n, 128, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, n, 128, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, 2, n, 128, generator=gen, device=dev, dtype=torch.bfloat16)
    t = torch.arange(n, device=dev)
    causal = t[:, None] >= t[None, :]
    m = n // bs
    keep = torch.rand(1, 8, m, m, generator=gen, device=dev) < 0.2
    keep |= torch.eye(m, dtype=torch.bool, device=dev)
    out = flex_block_sparse_attention(q, k, v, keep, bs, 128**-0.5)
    expected = masked_reference(q, k, v, keep[:, :, t[:, None] // bs, t[None, :] // bs] & causal)
    record("flex block-sparse 64x64 vs eager masked rel", rel(out, expected), 1e-2)
    sel = cab_select(
        q,
        k,
        bs,
        128**-0.5,
        keep_per_query_block(m, 2, 0.9).to(dev),
        must_keep=must_keep_blocks(m, 2, 1).to(dev),
        q_group=2,
        write_mask=True,
    )
    out = flex_attention_from_selection(q, k, v, sel, bs, 128**-0.5)
    token_keep = sel.mask[:, :, t[:, None] // (2 * bs), t[None, :] // bs] & causal
    record(
        "flex CAB 128x64 vs eager masked rel", rel(out, masked_reference(q, k, v, token_keep)), 1e-2
    )
    return results


# ---------------------------------------------------------------------------- stages


def run_predictor_stages(
    n: int, heads: int, head_dim: int, block_size: int, rep_ms: float, log=print
) -> list[dict]:
    """Time each predictor stage and the tile and precision choices of the heavy ones."""
    from attnlab.kernels.cab import cab_select
    from attnlab.kernels.coarsen import coarsen_max_l2
    from attnlab.kernels.curvature import adjacency_and_degrees, forman_ricci_from_degrees
    from attnlab.kernels.select import score_and_select

    dev, scaling = "cuda", head_dim**-0.5
    q = torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16)
    m = n // block_size
    qc, kc = coarsen_max_l2(q, block_size), coarsen_max_l2(k, block_size)
    a32, d_out, d_in = adjacency_and_degrees(qc, kc, scaling, fill_upper=False)
    a16 = adjacency_and_degrees(qc, kc, scaling, fill_upper=False, a_dtype=torch.bfloat16)[0]
    f = forman_ricci_from_degrees(a16, d_out, d_in)
    keep = keep_per_query_block(m, 2, 0.99).to(dev)
    must = must_keep_blocks(m, 2, 1).to(dev)
    stages = {"coarsen_qk": lambda: (coarsen_max_l2(q, block_size), coarsen_max_l2(k, block_size))}
    bf16 = torch.bfloat16
    adjacency_variants = (
        (torch.float32, 64, 64, 4), (bf16, 64, 64, 4), (bf16, 64, 64, 8),
        (bf16, 128, 64, 8), (bf16, 64, 32, 4), (bf16, 32, 64, 4),
    )  # fmt: skip
    for a_dtype, bm, bn, w in adjacency_variants:
        name = f"adjacency_{str(a_dtype)[6:]}_{bm}x{bn}_w{w}"
        stages[name] = lambda a_dtype=a_dtype, bm=bm, bn=bn, w=w: adjacency_and_degrees(
            qc, kc, scaling, fill_upper=False, a_dtype=a_dtype, block_m=bm, block_n=bn,
            num_warps=w,
        )  # fmt: skip
    for a, prec, blk, bk, st in ((a32, "tf32", 128, 32, 3), (a16, "bf16", 128, 64, 3),
                                 (a16, "bf16", 128, 64, 2)):  # fmt: skip
        name = f"curvature_{str(a.dtype)[6:]}_{prec}_t{blk}_k{bk}_s{st}"
        stages[name] = lambda a=a, prec=prec, blk=blk, bk=bk, st=st: forman_ricci_from_degrees(
            a, d_out, d_in, "directed", prec, blk, bk, st
        )
    stages["curvature_symmetric_bfloat16_t128"] = lambda: forman_ricci_from_degrees(
        a16, d_out, d_in, "symmetric", "bf16", 128
    )
    for warps in (2, 4, 8):
        stages[f"select_w{warps}"] = lambda warps=warps: score_and_select(
            f, keep, a=a16, must_keep=must, q_group=2, write_mask=False, write_indices=True,
            num_warps=warps,
        )  # fmt: skip
    stages["select_w4_one_launch"] = lambda: score_and_select(
        f, keep, must_keep=must, q_group=2, write_mask=False, write_indices=True, band_floor=m
    )
    stages["select_w4_lam0.5"] = lambda: score_and_select(
        f, keep, a=a16, lam=0.5, must_keep=must, q_group=2, write_mask=False, write_indices=True
    )
    keep90 = keep_per_query_block(m, 2, 0.9).to(dev)
    stages["select_w4_s90"] = lambda: score_and_select(
        f, keep90, a=a16, must_keep=must, q_group=2, write_mask=False, write_indices=True
    )
    cfg = KernelBench()
    stages["predictor_default"] = lambda: _gpu_selection(q, k, cfg, keep, must, scaling)
    stages["predictor_tf32"] = lambda: cab_select(
        q, k, block_size, scaling, keep, must_keep=must, q_group=2, precision="tf32"
    )
    rows = []
    for name, fn in stages.items():
        try:
            ms, reps = median_ms(fn, dev, rep_ms, 10)
        except Exception as err:
            ms, reps = float("nan"), 0
            log(f"  stage {name} failed: {type(err).__name__}: {str(err)[:150]}")
        rows.append({"stage": name, "n": n, "m": m, "heads": heads, "ms": ms, "reps": reps})
        log(f"  stage {name:<40} {ms:8.3f} ms")
    return rows


def apply_stage_timings(cfg: KernelBench, stages_csv: str | Path) -> None:
    """Set the predictor's select warps and bf16 adjacency tiles to the fastest timed."""
    with open(stages_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["ms"] not in ("", "nan")]

    def fastest(pattern):
        timed = [r for r in rows if re.fullmatch(pattern, r["stage"])]
        return min(timed, key=lambda r: float(r["ms"]))["stage"] if timed else None

    best = fastest(r"select_w\d+")
    if best:
        cfg.select_warps = int(best.removeprefix("select_w"))
    best = fastest(r"adjacency_bfloat16_\d+x\d+_w\d+")
    if best:
        tiles, warps = best.removeprefix("adjacency_bfloat16_").split("_w")
        cfg.adjacency_block_m, cfg.adjacency_block_n = map(int, tiles.split("x"))
        cfg.adjacency_warps = int(warps)


# ---------------------------------------------------------------------------- output


def write_table(rows: list[dict], out_dir: Path, name: str, meta: dict) -> list[Path]:
    """Write rows (plus the meta columns) as CSV, and as Parquet when pyarrow imports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{**row, **meta} for row in rows]
    written = []
    tmp = out_dir / f".{name}.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / f"{name}.csv")
    written.append(out_dir / f"{name}.csv")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    tmp = out_dir / f".{name}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    tmp.replace(out_dir / f"{name}.parquet")
    written.append(out_dir / f"{name}.parquet")
    return written


def _environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    env["date"] = time.strftime("%Y-%m-%d")
    return env


def bench_kernels(
    out_dir: str | Path, fig: str | Path | None, cfg: KernelBench | None = None, check: bool = True
) -> list[dict]:
    """Run the kernel benchmark (and the CUDA checks), write the table and the figure."""
    cuda = torch.cuda.is_available()
    if cfg is None:
        cfg = KernelBench() if cuda else cpu_variant()
    out_dir = Path(out_dir)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if cuda and check:
        checks = check_kernels_cuda(log)
        write_table(checks, out_dir, "kernels_checks", _environment())
        if not all(c["ok"] for c in checks):
            log("some kernel checks failed; timing anyway, see kernels_checks.csv")
    meta = {k: v for k, v in asdict(cfg).items() if not isinstance(v, tuple)}
    meta.update(_environment())
    rows = run_kernel_bench(cfg, log, lambda so_far: write_table(so_far, out_dir, "kernels", meta))
    written = write_table(rows, out_dir, "kernels", meta)
    if fig is not None:
        from attnlab.plots.kernels import plot_kernel_speed

        plot_kernel_speed(written[-1], fig)
    _print_summary(rows)
    return rows


def cpu_variant() -> KernelBench:
    """The small-N setting run where there is no GPU."""
    return KernelBench(
        lengths=CPU_LENGTHS,
        heads=4,
        kv_heads=4,
        head_dim=64,
        dtype="float32",
        rep_ms=200.0,
        min_reps=3,
        reference_predictor=False,
    )


def _print_summary(rows: list[dict]) -> None:
    print(f"\n{'method':<24}{'N':>8}{'density':>9}{'ms':>10}{'TFLOP/s':>9}{'eff':>9}{'x dense':>9}")
    for r in rows:
        print(
            f"{r['method']:<24}{r['n']:>8}{r['density']:>9.4f}{r['ms']:>10.3f}{r['tflops']:>9.1f}"
            f"{r['tflops_effective']:>9.1f}{r['speedup_vs_dense']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m attnlab.bench", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kb = sub.add_parser("kernels", help="dense attention against CAB, latency by context length")
    kb.add_argument(
        "--out", default="results/bench", help="folder for kernels.csv / kernels.parquet"
    )
    kb.add_argument("--fig", default="figs/kernel_speed.png", help="figure path ('' for none)")
    kb.add_argument(
        "--lengths", type=int, nargs="+", help="context lengths (default: 16k..128k, CPU 512, 1k)"
    )
    kb.add_argument("--heads", type=int)
    kb.add_argument("--kv-heads", type=int)
    kb.add_argument("--head-dim", type=int)
    kb.add_argument("--block-size", type=int)
    kb.add_argument("--q-group", type=int)
    kb.add_argument("--sparsities", type=float, nargs="+")
    kb.add_argument("--methods", nargs="+", help="only methods starting with these names")
    kb.add_argument("--rep-ms", type=float)
    kb.add_argument("--no-check", action="store_true", help="skip the CUDA kernel checks")
    kb.add_argument(
        "--tuned-from", help="predictor_stages.csv: take the fastest select and adjacency tiles"
    )
    kb.add_argument("--no-reference", action="store_true", help="skip the PyTorch predictor")
    st = sub.add_parser("predictor", help="time the predictor's stages and tile choices (CUDA)")
    st.add_argument("--out", default="results/bench")
    st.add_argument("--length", type=int, default=131072)
    st.add_argument("--heads", type=int, default=32)
    st.add_argument("--head-dim", type=int, default=128)
    st.add_argument("--block-size", type=int, default=64)
    st.add_argument("--rep-ms", type=float, default=200.0)
    from attnlab import bench_capture, bench_prefill

    bench_capture.add_parser(sub)
    bench_prefill.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "capture":
        bench_capture.main(args)
        return
    if args.command == "prefill":
        bench_prefill.main(args)
        return
    if args.command == "predictor":
        if not torch.cuda.is_available():
            sys.exit("the predictor stages need CUDA")
        rows = run_predictor_stages(
            args.length, args.heads, args.head_dim, args.block_size, args.rep_ms
        )
        write_table(rows, Path(args.out), "predictor_stages", _environment())
        return

    cfg = KernelBench() if torch.cuda.is_available() else cpu_variant()
    overrides = {
        "lengths": tuple(args.lengths) if args.lengths else None,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "q_group": args.q_group,
        "sparsities": tuple(args.sparsities) if args.sparsities else None,
        "methods": tuple(args.methods) if args.methods else None,
        "rep_ms": args.rep_ms,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.heads is not None and args.kv_heads is None:
        cfg.kv_heads = args.heads
    if args.no_reference:
        cfg.reference_predictor = False
    if args.tuned_from:
        apply_stage_timings(cfg, args.tuned_from)
    bench_kernels(args.out, args.fig or None, cfg, check=not args.no_check)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
