"""One generated token's attention over a long cache (the cache regime's cost), per policy.

For a layer of given shape (query heads, key/value heads, head dim) and a cache of T keys,
each row times what one decode step's attention costs: dense attention over the whole
cache (PyTorch's SDPA, its flash/efficient decoding kernels), an evicted cache of the
budget's size (attention over n = round((1 - s) T) keys, whatever chose them), and each
query-aware policy's select + gather + attend at the same budget:

- ``topk``: exact scores of every key, the n best per query head, their keys and values
  gathered, attention over them (the oracle's cost: it reads every key);
- ``quest``: each page's channel-wise key minimum and maximum (kept beside the cache, as
  Quest does), the upper bound per page, the n / page best pages per query head, their
  keys gathered;
- ``sparq``: the r = D / 8 largest-|q| channels, approximate scores from those channels
  of every key, the n best, their keys gathered;
- ``loki``: the query rotated into the keys' principal axes, approximate scores from the
  first r = D / 4 coordinates of every key (kept rotated and channel-major, as Loki
  stores them), the n best, their keys gathered;
- ``two_stage``: Quest's bound per page, the best pages holding 4 n keys (the policy's
  ``expand``), those candidates' keys gathered and scored exactly, the n best.

Selections are per query head as the policies make them (``attnlab.policies``); each row
has its speedup against dense in the same run. Inputs are random (latency does not depend
on values). Needs torch only.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import torch

from attnlab.bench.timing import environment, median_ms, write_table
from attnlab.policies.loki import Loki
from attnlab.policies.two_stage import TwoStage

SHAPES = {  # name: (query heads, key/value heads, head dim)
    "llama3-8b": (32, 8, 128),
    "gemma3-270m": (4, 1, 256),
}
POLICIES = ("dense", "evicted", "topk", "quest", "sparq", "loki", "two_stage")
EXPAND = TwoStage.expand  # two-stage's candidate keys per kept key (its default)
LOKI_CHANNELS = Loki.channels  # the share of the rotated coordinates Loki reads


def _attend(q, k, v, scale):
    """q: (1, H, 1, D), k, v: (1, H or Hkv, n, D) -> (1, H, 1, D)."""
    gqa = k.shape[1] != q.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def _gather(x: torch.Tensor, idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows ``idx`` (1, H, n) of x (1, Hkv, T, D), each query head's from its key/value
    head, reading only those rows -> (1, H, n, D)."""
    kv = torch.arange(idx.shape[1], device=x.device) // groups
    return x[0][kv[:, None], idx[0]].unsqueeze(0)


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(1, H, 1, D) -> (1, Hkv, G, D): a key/value head's query heads side by side."""
    return q.view(1, hkv, -1, q.shape[-1])


def _page_bounds(q, bounds, hkv: int) -> torch.Tensor:
    """Quest's upper bound of q . k over each page: (1, H, P)."""
    kmin, kmax = bounds  # (1, Hkv, P, D)
    qg = _grouped(q, hkv)
    pos = qg.clamp(min=0)
    return (pos @ kmax.transpose(-1, -2) + (qg - pos) @ kmin.transpose(-1, -2)).view(
        1, q.shape[1], -1
    )


def _page_keys(pages: torch.Tensor, page: int) -> torch.Tensor:
    """Key indices of pages (1, H, c) -> (1, H, c * page)."""
    return (pages.unsqueeze(-1) * page + torch.arange(page, device=pages.device)).flatten(2)


def step(
    policy: str,
    q,
    k,
    v,
    n: int,
    scale: float,
    page: int = 16,
    bounds=None,
    kt=None,
    rotated=None,
):
    """One decode step's attention under ``policy`` keeping n keys per query head; bounds:
    Quest's page minima and maxima (1, Hkv, P, D); kt: the keys channel-major (1, Hkv, D,
    T), the second copy SparQ keeps so that reading r channels of every key is r rows;
    rotated: Loki's (axes (Hkv, D, D), the keys in them channel-major (1, Hkv, D, T))."""
    h, hkv = q.shape[1], k.shape[1]
    groups = h // hkv
    if policy in ("dense", "evicted"):  # an evicted cache is dense over its n keys
        return _attend(q, k, v, scale)
    if policy == "topk":
        s = (_grouped(q, hkv) @ k.transpose(-1, -2)).view(1, h, -1)  # (1, H, T)
        idx = s.topk(n, dim=-1).indices
    elif policy == "quest":
        pages = _page_bounds(q, bounds, hkv).topk(max(1, n // page), dim=-1).indices
        idx = _page_keys(pages, page)  # (1, H, n)
    elif policy == "two_stage":
        ub = _page_bounds(q, bounds, hkv)  # (1, H, P)
        pages = ub.topk(min(ub.shape[-1], max(1, math.ceil(EXPAND * n / page))), dim=-1).indices
        cand = _page_keys(pages, page)  # (1, H, c): the candidates, then exact scores
        s = (q @ _gather(k, cand, groups).transpose(-1, -2))[:, :, 0]  # (1, H, c)
        idx = cand.gather(-1, s.topk(min(n, cand.shape[-1]), dim=-1).indices)
    elif policy == "loki":
        axes, krt = rotated
        r = round(LOKI_CHANNELS * q.shape[-1])
        qr = _grouped(q, hkv)[0] @ axes[:, :, :r]  # (Hkv, G, r): the query, rotated
        idx = (qr @ krt[0, :, :r]).reshape(1, h, -1).topk(n, dim=-1).indices
    elif policy == "sparq":
        r = q.shape[-1] // 8
        ch = q.abs().topk(r, dim=-1).indices  # (1, H, 1, r)
        kv = torch.arange(h, device=q.device) // groups
        ks = kt[0][kv[:, None], ch[0, :, 0]]  # (H, r, T): r channels of every key
        qs = q.gather(3, ch)[0]  # (H, 1, r)
        idx = (qs @ ks)[:, 0].topk(n, dim=-1).indices.unsqueeze(0)  # (1, H, n)
    else:
        raise ValueError(f"unknown decode policy {policy!r}")
    return _attend(q, _gather(k, idx, groups), _gather(v, idx, groups), scale)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (shape, cache length, policy, sparsity): median ms and the speedup
    against dense attention over the same cache, timed in this run."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in args.shapes:
        h, hkv, d = SHAPES[shape]
        scale = d**-0.5
        for t in args.lengths:
            q = torch.randn(1, h, 1, d, device=device, dtype=dtype, generator=gen)
            k = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen)
            v = torch.randn(1, hkv, t, d, device=device, dtype=dtype, generator=gen)
            pages = k.view(1, hkv, t // args.page, args.page, d)
            bounds = (pages.amin(3), pages.amax(3))
            kt = k.transpose(-1, -2).contiguous()
            axes = torch.linalg.qr(torch.randn(hkv, d, d, generator=gen, device=device).float())
            axes = axes.Q.to(dtype)  # orthonormal: Loki's principal axes stand-in
            rotated = (axes, (k[0] @ axes).transpose(-1, -2).contiguous().unsqueeze(0))
            dense = None
            for policy in args.policies:
                for s in [0.0] if policy == "dense" else args.sparsities:
                    n = max(1, round((1 - s) * t))
                    kk, vv = (k[:, :, :n], v[:, :, :n]) if policy == "evicted" else (k, v)

                    fn = functools.partial(
                        step, policy, q, kk, vv, n, scale, args.page, bounds, kt, rotated
                    )
                    with torch.inference_mode():
                        ms, reps = median_ms(fn, device, args.rep_ms, args.min_reps, 1000)
                    dense = ms if policy == "dense" else dense
                    rows.append(
                        {
                            "shape": shape,
                            "heads": h,
                            "kv_heads": hkv,
                            "head_dim": d,
                            "cache": t,
                            "policy": policy,
                            "target_sparsity": s,
                            "kept": n,
                            "ms": ms,
                            "reps": reps,
                            "dtype": args.dtype,
                        }
                    )
            for r in rows:
                if r["shape"] == shape and r["cache"] == t:
                    r["speedup_vs_dense"] = dense / r["ms"] if dense else float("nan")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench decode``."""
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    p.add_argument("--page", type=int, default=16, help="Quest's page (divides lengths)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rep-ms", type=float, default=500.0, help="time budget per entry")
    p.add_argument("--min-reps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="results/bench", help="folder for decode.parquet / .csv")
    p.add_argument("--fig", default="figs/bench_decode.png", help="figure path ('' for none)")


def main(args: argparse.Namespace) -> list[dict]:
    """Time every entry and write ``decode.parquet`` / ``.csv`` under ``--out``."""
    args.policies = ["dense", *(p for p in args.policies if p != "dense")]  # the reference
    if any(t % args.page for t in args.lengths):
        raise SystemExit(f"attnlab bench decode: --page {args.page} must divide every length")
    rows = run(args)
    written = write_table(rows, Path(args.out), "decode", environment())
    if args.fig:
        from attnlab.plots.decode import plot_decode_bench

        plot_decode_bench(written[-1], args.fig)
    return rows
