"""Capture benchmark: the capture stage against the straightforward approach.

``attnlab bench capture`` runs, side by side in one process on the same model and the
same chunks, (a) :func:`attnlab.capture.capture_metrics`: one forward pass in which each
layer's weights are reduced to per-token metrics as the layer runs, and (b) the
straightforward approach: ``model(ids, output_attentions=True)`` with transformers' eager
attention, then the same metrics (:func:`attnlab.metrics.row_metrics`) from the stored
matrices, layer by layer. A third method is (b) with
``logits_to_keep=1``, to show how much of the difference is the language-model head
(capture needs no logits). The methods take turns within each repeat; the table holds every
run's tokens per second and peak memory above the memory held before the run (resident
set on the CPU, sampled every millisecond; allocated memory on CUDA), and the largest
difference between the two methods' metrics, which must be ~0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from attnlab.bench.timing import PeakMemory, environment, return_freed_memory, write_table


def straightforward(
    model, tokens: np.ndarray, mass: float, logits_to_keep: int = 0
) -> dict[str, np.ndarray]:
    """output_attentions=True, then metrics of every stored layer: name -> (B, L, H, T).
    ``logits_to_keep=0`` computes the logits of every position, as a plain call does."""
    from attnlab import attention, metrics

    model.set_attn_implementation("eager")
    try:
        ids = torch.as_tensor(tokens, dtype=torch.long, device=model.device)
        with torch.inference_mode():
            out = model(input_ids=ids, output_attentions=True, logits_to_keep=logits_to_keep)
            q_pos = torch.arange(ids.shape[1])
            per_layer = [metrics.row_metrics(a, q_pos, mass) for a in out.attentions]
    finally:
        attention.install(model)
    return {m: torch.stack([p[m] for p in per_layer], 1).numpy() for m in metrics.METRICS}


def fused(model, tokens: np.ndarray, n_kv_heads: int, mass: float) -> dict[str, np.ndarray]:
    """The capture stage's path: name -> (B, L, H, T)."""
    from attnlab import capture, metrics

    table, _ = capture.capture_metrics(model, tokens, n_kv_heads, mass)
    b, t = tokens.shape
    return {
        m: table[m].to_numpy().reshape(b, -1, model.config.num_attention_heads, t)
        for m in metrics.METRICS
    }


def corpus_tokens(tokenizer, chunks: int, chunk_len: int) -> np.ndarray:
    """Chunks of real text every machine has: CPython's help topics, tokenized."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = chunks * chunk_len
    if len(ids) < need:
        raise SystemExit(f"the help topics give {len(ids)} tokens, fewer than {need}")
    return np.asarray(ids[:need], dtype=np.int64).reshape(chunks, chunk_len)


def run(args, model_name: str) -> list[dict]:
    """Time the methods on one model; rows of the table (one per method and repeat)."""
    from attnlab import attention, metrics, models

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_exact = args.device == "cpu" and return_freed_memory()
    model, tokenizer, info = models.load(model_name, device=args.device)
    attention.install(model)
    if args.manifest:
        from attnlab.corpus import read_corpus

        tokens = read_corpus(args.manifest)[: args.chunks].astype(np.int64)
    else:
        tokens = corpus_tokens(tokenizer, args.chunks, args.chunk_len)
    batches = [tokens[i : i + args.batch_size] for i in range(0, len(tokens), args.batch_size)]
    methods = {
        "capture": lambda b: fused(model, b, info.n_kv_heads, args.mass),
        "output_attentions": lambda b: straightforward(model, b, args.mass),
        # the same, told to skip the logits of every position but the last, as capture does
        "output_attentions_last_logits": lambda b: straightforward(model, b, args.mass, 1),
    }
    # Warm-up, and the check that both give the same numbers.
    first = {name: fn(batches[0]) for name, fn in methods.items()}
    diff = max(
        float(np.nanmax(np.abs(first["capture"][m] - first["output_attentions"][m])))
        for m in metrics.METRICS
    )
    print(f"largest metric difference between the methods: {diff:.2e}", flush=True)
    rows = []
    order = list(methods)
    for rep in range(args.repeats):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:  # rotate
            with PeakMemory(args.device) as mem:
                start = time.perf_counter()
                for b in batches:
                    methods[name](b)
                seconds = time.perf_counter() - start
            rows.append(
                {
                    "method": name,
                    "repeat": rep,
                    "tokens": int(tokens.size),
                    "seconds": seconds,
                    "tokens_per_s": tokens.size / seconds,
                    "peak_mem_mib": mem.mib,
                }
            )
            print(
                f"{model_name:<14} {name:<30} rep {rep}: {tokens.size / seconds:8.1f} tok/s, "
                f"peak +{mem.mib:8.1f} MiB",
                flush=True,
            )
    meta = {
        "model": model_name,
        "device": args.device,
        "threads": args.threads,
        "chunks": len(tokens),
        "chunk_len": tokens.shape[1],
        "batch_size": args.batch_size,
        "layers": info.n_layers,
        "max_metric_diff": diff,
        "rss_returns_freed_memory": rss_exact,
    }
    return [{**r, **meta} for r in rows]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench capture``."""
    # an option of bench.CONFIG_KEYS left unset reads the config
    p.add_argument("--models", nargs="+")
    p.add_argument("--manifest", help="take the chunks from a corpus manifest (else help topics)")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-len", type=int)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--mass", type=float)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/bench", help="folder for capture.parquet / .csv")
    p.add_argument("--fig", default="figs/bench_capture.png", help="figure path ('' for none)")


def main(args: argparse.Namespace) -> list[dict]:
    """Time every model, write ``capture.parquet`` / ``.csv`` and the figure, print the
    medians."""
    from attnlab.plots.bench import plot_capture_bench, summary

    rows = [row for name in args.models for row in run(args, name)]
    written = write_table(rows, Path(args.out), "capture", environment())  # torch, host, date
    if args.fig:
        plot_capture_bench(written[-1], args.fig)
    for (model, name), s in summary(rows).items():
        print(
            f"{model:<14} {name:<30} median {s['tokens_per_s']:8.1f} tok/s, "
            f"peak +{s['peak_mem_mib']:8.1f} MiB"
        )
    return rows
