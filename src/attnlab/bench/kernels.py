"""Kernel benchmark: the CAB predictor and block-sparse attention against dense attention.

``attnlab bench kernels`` times, side by side in one process and on the same inputs, dense
causal attention (SDPA flash, SDPA cuDNN, flex) and CAB in each selection form the prefill
regime scores (``prompt``: the whole prompt's graph; ``causal``: each query block chosen by
its first row; the ``selection`` column says which): the Triton predictor as the scoring
path runs it (float32 A, ``--precision bf16`` a faster one, marked not scored) alone, and
predictor + BlockMask + flex block-sparse attention at each sparsity, for B = 1, H = 32,
D = 128, bf16 and N from 16k to 128k, then writes a table (CSV always, Parquet when pyarrow
imports) and ``figs/bench_kernels.png``. Without CUDA it runs a small-N CPU variant with the
PyTorch predictor and eager flex, so the pipeline runs everywhere. The kernels' checks
against their references on the GPU are tests (``tests/test_kernels_cuda.py``).

Needs only torch (and triton on CUDA); matplotlib for the figure, pyarrow for Parquet.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from attnlab.bench.budgets import kept_pairs, must_keep_mask, scored_blocks_per_query_block
from attnlab.bench.timing import environment, median_ms, write_table
from attnlab.blocks import n_blocks

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
    # score rows pooled per selected query block: 1 is the selection the prefill regime
    # scores; 2 (2 x 64 = 128 tokens, flex's own tile) a faster selection no scoring path
    # makes, its rows marked so
    q_group: int = 1
    # CAB's selection forms timed (DESIGN): "prompt" rows are named cab_*, "causal" ones
    # cab_causal_*
    forms: tuple[str, ...] = ("prompt", "causal")
    sparsities: tuple[float, ...] = (0.90, 0.95, 0.99)
    lam: float = 1.0
    adjacency: str = "softmax"
    graph: str = "symmetric"
    sink_blocks: int = 1
    # of A and A @ A in the Triton predictor: "ieee" (float32, with the reference's
    # coarsening) is the scoring path's predictor (kernels.cab.cab_scores); "bf16" and
    # "tf32" are faster selections no scoring path makes, their rows marked so
    precision: str = "ieee"
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


def _torch_selection(q, k, cfg: KernelBench, keep, must, scaling, form="prompt"):
    """The plain-PyTorch predictor in selection ``form``, as flex block lists."""
    from attnlab.kernels import reference as ref

    if form == "prompt":
        score = ref.cab_block_scores(
            q, k, cfg.block_size, scaling, cfg.lam, cfg.adjacency, cfg.graph
        )
    else:  # each query block's first row
        starts = torch.arange(0, q.shape[-2], cfg.block_size, device=q.device)
        score = ref.cab_row_scores(
            q, k, starts, cfg.block_size, scaling, cfg.lam, cfg.adjacency, cfg.graph
        )
    mask = ref.top_blocks_grouped(score, keep, cfg.q_group, must)  # (B, H, Mg, M)
    mg, m = mask.shape[-2:]
    first = (torch.arange(mg, device=mask.device) * cfg.q_group)[:, None]
    cols = torch.arange(m, device=mask.device)[None, :]
    lists = {}
    for name, part in (("full", mask & (cols < first)), ("partial", mask & (cols >= first))):
        lists[f"{name}_num"] = part.sum(-1, dtype=torch.int32)
        order = part.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        lists[f"{name}_idx"] = order.to(torch.int32)
    return SimpleNamespace(q_group=cfg.q_group, mask=mask, score=score, **lists)


def _gpu_selection(q, k, cfg: KernelBench, keep, must, scaling, form="prompt", **kw):
    from attnlab.kernels import reference
    from attnlab.kernels.cab import cab_select

    if cfg.precision == "ieee":  # the scoring path's representatives (cab_scores)
        kw.setdefault("coarsen", reference.coarsen_max_l2)
    return cab_select(
        q, k, cfg.block_size, scaling, keep, form=form, lam=cfg.lam, adjacency=cfg.adjacency,
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

    def timed(method, fn, selection="dense", **extra):
        if cfg.methods and not any(method.startswith(w) for w in cfg.methods):
            return
        try:
            ms, reps = median_ms(fn, device, cfg.rep_ms, cfg.min_reps)
            row = _row(device, method, n, ms, reps, **extra)
        except Exception as err:  # a backend that cannot run this shape is a row, not a crash
            msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            row = _row(device, method, n, float("nan"), 0, status=msg)
        row["selection"] = selection  # which selection a CAB row times
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

    m = n_blocks(n, cfg.block_size)
    must = must_keep_mask(m, cfg.q_group, cfg.sink_blocks).to(device)
    s_max = max(cfg.sparsities)
    keep_max = scored_blocks_per_query_block(n, cfg.block_size, s_max, cfg.q_group).to(device)
    for form in cfg.forms:
        name = "cab_" if form == "prompt" else f"cab_{form}_"
        select = dict(form=form)
        apart = [f"pooled {cfg.q_group} rows"] * (cfg.q_group > 1)
        apart += [f"{cfg.precision} A"] * (cfg.precision != "ieee" and device == "cuda")
        label = f"{', '.join([form, *apart])} (not scored)" if apart else form
        # two sweeps per coarse graph (the causal form has two: first rows, whole blocks),
        # and the product's multiply-adds as the curvature kernels loop: k from j to i for
        # the directed graph (a sixth of M^3), from 0 to M (prompt) or to i (causal) for
        # the symmetric one
        graphs = 1 if form == "prompt" else 2
        share = 1 / 6 if cfg.graph == "directed" else 1 / 2 if form == "prompt" else 1 / 3
        flops = 4 * cfg.head_dim * m * (m + 1) / 2 * graphs + 2 * m**3 * share
        flops *= cfg.batch * cfg.heads
        timed(
            f"{name}predictor",
            lambda select=select: predictor(q, k, cfg, keep_max, must, scaling, **select),
            label, sparsity=s_max, flops=flops,
        )  # fmt: skip
        if device == "cuda" and cfg.reference_predictor:
            timed(
                f"{name}predictor_torch",
                lambda select=select: _torch_selection(
                    q, k, cfg, keep_max, must, scaling, **select
                ),
                label, sparsity=s_max, flops=flops,
            )  # fmt: skip
        for s in cfg.sparsities:
            keep = scored_blocks_per_query_block(n, cfg.block_size, s, cfg.q_group).to(device)
            sel = predictor(q, k, cfg, keep, must, scaling, **select)
            pairs = kept_pairs(sel, cfg.block_size, n)
            sparse = dict(
                sparsity=s,
                density=pairs / causal_pairs,
                flops=4 * cfg.head_dim * pairs,
                dense_flops=dense_flops,
            )

            def flex_only(sel=sel):
                return flex_attention_from_selection(q, k, v, sel, cfg.block_size, scaling)

            def end_to_end(keep=keep, select=select):
                chosen = predictor(q, k, cfg, keep, must, scaling, **select)
                return flex_attention_from_selection(q, k, v, chosen, cfg.block_size, scaling)

            tag = f"s{round(s * 100)}"
            timed(f"{name}flex_{tag}", flex_only, label, **sparse)
            timed(f"{name}e2e_{tag}", end_to_end, label, **sparse)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """Ratio to cuDNN dense (the CPU's dense SDPA) at the same length, from the same run."""
    for row in rows:
        base = [
            r["ms"] for r in rows if r["n"] == row["n"] and r["method"] in ("sdpa_cudnn", "sdpa")
        ]
        ok = base and base[0] == base[0] and row["ms"] == row["ms"]
        row["speedup_vs_dense"] = base[0] / row["ms"] if ok else float("nan")


def bench_kernels(out_dir: str | Path, fig: str | Path | None, cfg: KernelBench) -> list[dict]:
    """Run the kernel benchmark, write the table (after each length, so a long run that
    stops keeps what it timed) and the figure."""
    out_dir = Path(out_dir)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    meta = {k: v for k, v in asdict(cfg).items() if not isinstance(v, tuple)}
    meta.update(environment())
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench kernels``; unset ones keep the setting's value."""
    p.add_argument(
        "--out", default="results/bench", help="folder for kernels.csv / kernels.parquet"
    )
    p.add_argument("--fig", default="figs/bench_kernels.png", help="figure path ('' for none)")
    p.add_argument(
        "--lengths", type=int, nargs="+", help="context lengths (default: 16k..128k, CPU 512, 1k)"
    )
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--q-group", type=int)
    p.add_argument("--forms", nargs="+", choices=("prompt", "causal"), help="CAB's selection forms")
    p.add_argument(
        "--precision",
        choices=("ieee", "tf32", "bf16"),
        help="of CAB's A and A @ A (ieee: the scoring path's; the others are not scored)",
    )
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--methods", nargs="+", help="only methods starting with these names")
    p.add_argument("--rep-ms", type=float)
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch predictor")


def setting(args: argparse.Namespace) -> KernelBench:
    """The GPU setting (the CPU variant without CUDA) with the options given on top."""
    cfg = KernelBench() if torch.cuda.is_available() else cpu_variant()
    overrides = {
        "lengths": tuple(args.lengths) if args.lengths else None,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "q_group": args.q_group,
        "forms": tuple(args.forms) if args.forms else None,
        "precision": args.precision,
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
    return cfg


def main(args: argparse.Namespace) -> list[dict]:
    """Run ``attnlab bench kernels`` as parsed by :func:`add_arguments`."""
    return bench_kernels(args.out, args.fig or None, setting(args))
