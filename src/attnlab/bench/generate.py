"""A real model's per-token decode latency over a long prompt, per cache-regime policy:
the scored path's cost of one generated token (the cache regime's half of the
accuracy-matched table; ``decode`` times the attention alone).

Each (policy, sparsity) prefills one NIAH prompt densely in the ``cache`` regime, as the
NIAH jobs do (an evicting policy compresses the cache at the prompt's end), then times
one generated token's forward pass under the policy: its selection among the cached keys
and the model's attention under that keep-mask, every layer, and the rest of the model.
The cache is cropped back after each timed step, so every step is the first generated
token. The run records no recall here (its softmax over the cache is the instrument's
cost, not the policy's). attnlab's cache holds every key and masks what a policy drops,
so this is the scored selection's latency through a masked dense kernel, not an evicted
or gathered cache's (``attnlab bench decode`` times those).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnlab.bench.timing import environment, median_ms, write_table


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (policy, target sparsity): median ms of one generated token, its
    repetitions, and the speedup against full attention's step in this run."""
    from attnlab import attention, decoding, models, policies, sparse
    from attnlab.bench.prefill import prompt_ids

    torch.set_num_threads(args.threads)
    model, _, _ = models.load(args.model, device=args.device, dtype=args.dtype)
    model = attention.install(model)
    ids = prompt_ids(args.prompts, args.length, model.device)
    t = ids.shape[-1]
    rows = []
    for name in ["full", *(p for p in args.policies if p != "full")]:
        for s in [0.0] if name == "full" else args.sparsities:
            r = sparse.SparseRun(policies.make(name), s, regime="cache", records=False)
            with torch.inference_mode():
                cache, logits = decoding.prefill(model, ids, r)
            token = logits.argmax().view(1, 1)

            @torch.inference_mode()
            def step(r=r, cache=cache, token=token):
                with r:
                    model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.crop(-1)  # back to the prompt: every step is the first token

            ms, reps = median_ms(step, model.device.type, args.rep_ms, args.min_reps, 200)
            if cache.get_seq_length() != t:  # each timed step must start from the prompt
                raise RuntimeError(f"the cache holds {cache.get_seq_length()} keys, not {t}")
            rows.append(
                {
                    "model": args.model,
                    "length": t,
                    "regime": "cache",
                    "policy": name,
                    "target_sparsity": s,
                    "ms": ms,
                    "reps": reps,
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                }
            )
            print(f"{name:<14} {s:5.2f} {ms:9.2f} ms  ({reps} reps)", flush=True)
            del cache
    full = rows[0]["ms"]
    for row in rows:  # the side-by-side ratio, measured in this run
        row["speedup_vs_full"] = full / row["ms"]
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench generate`` (``--policies``: cache-regime policies;
    full attention, the reference, always runs)."""
    from attnlab.bench.prefill import model_arguments

    model_arguments(p, "generate", rep_ms=1000.0, min_reps=5)


def main(args: argparse.Namespace) -> list[dict]:
    """Time every entry and write ``generate.parquet`` / ``.csv`` under ``--out``."""
    rows = run(args)
    write_table(rows, Path(args.out), "generate", environment())
    return rows
