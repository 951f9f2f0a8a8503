"""Causal check of induction heads: ablate heads, measure copying.

A head is ablated on its slice of the attention output before the output projection
(the o_proj input), never after it: ``zero`` sets the slice to 0, ``mean`` replaces it
by its mean over the prompt's positions. Copy accuracy is next-token accuracy at the copy
operations of repeated random prompts: at query t the model should predict token t + 1,
which the earlier copy shows it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from attnlab import hooks
from attnlab.errors import UserError
from attnlab.induction import InductionPrompt
from attnlab.jobs import InductionCausal
from attnlab.stats import bootstrap_ci


@contextlib.contextmanager
def ablate_heads(model, heads: Sequence[tuple[int, int]], mode: str = "zero") -> Iterator[None]:
    """While the block runs, ablate each (layer, head) in ``heads``."""
    if mode not in ("zero", "mean"):
        raise UserError(f"unknown ablation {mode!r} (zero, mean)")
    layers = hooks.decoder_layers(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def make_hook(heads_here: list[int], head_dim: int):
        def hook(module, args):
            x = args[0].clone()  # (B, T, H * D)
            for h in heads_here:
                sl = slice(h * head_dim, (h + 1) * head_dim)
                if mode == "zero":
                    x[..., sl] = 0
                else:
                    x[..., sl] = x[..., sl].mean(dim=1, keepdim=True)
            return (x, *args[1:])

        return hook

    handles = []
    for layer, heads_here in by_layer.items():
        attn = layers[layer].self_attn
        handles.append(attn.o_proj.register_forward_pre_hook(make_hook(heads_here, attn.head_dim)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def copy_accuracy(model, prompts: list[InductionPrompt], batch_size: int = 8) -> np.ndarray:
    """Per prompt, the share of copy operations t (with t + 1 in the prompt) at which the
    model's top prediction is the next token."""
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = torch.as_tensor(np.stack([p.tokens for p in batch]), device=model.device)
        pred = model(input_ids=ids, use_cache=False).logits.argmax(-1).cpu().numpy()
        for b, p in enumerate(batch):
            t = p.queries[p.queries + 1 < len(p.tokens)]
            out.append(float((pred[b, t] == p.tokens[t + 1]).mean()))
    return np.asarray(out)


def causal_check(
    model,
    prompts: list[InductionPrompt],
    head_scores: np.ndarray,
    k: int,
    mode: str = "zero",
    draws: int = 5,
    seed: int = 0,
    resamples: int = 2000,
    batch_size: int = 8,
) -> dict:
    """Copy accuracy with no ablation, with the top-k induction heads ablated, and with k
    random heads (drawn from the others, ``draws`` times) ablated; deltas with 95%
    intervals from a bootstrap over prompts (paired)."""
    n_layers, n_heads = head_scores.shape
    if not 0 < k < n_layers * n_heads:
        raise UserError(f"causal k = {k} must be between 1 and {n_layers * n_heads - 1}")
    order = np.argsort(head_scores.ravel())[::-1]
    top = [divmod(int(i), n_heads) for i in order[:k]]
    base = copy_accuracy(model, prompts, batch_size)
    with ablate_heads(model, top, mode):
        top_acc = copy_accuracy(model, prompts, batch_size)
    rng = np.random.default_rng(seed)
    rest = order[k:]
    random_sets, random_acc = [], []
    for _ in range(draws):
        pick = [divmod(int(i), n_heads) for i in rng.choice(rest, size=k, replace=False)]
        with ablate_heads(model, pick, mode):
            random_acc.append(copy_accuracy(model, prompts, batch_size))
        random_sets.append(pick)
    rand = np.mean(random_acc, axis=0)  # per prompt, over draws
    return {
        "k": k,
        "mode": mode,
        "prompts": len(prompts),
        "top_heads": top,
        "random_heads": random_sets,
        "baseline": float(base.mean()),
        "topk": float(top_acc.mean()),
        "random": float(rand.mean()),
        "random_per_draw": [float(a.mean()) for a in random_acc],
        "delta_topk": float((top_acc - base).mean()),
        "delta_topk_ci": list(bootstrap_ci(top_acc - base, resamples, seed=seed)),
        "delta_random": float((rand - base).mean()),
        "delta_random_ci": list(bootstrap_ci(rand - base, resamples, seed=seed)),
    }


def write_causal(job: InductionCausal) -> None:
    """:func:`causal_check` of the ``job.k`` top-scoring heads (the head scores of
    ``job.profile``) on the first ``job.n_prompts`` unshuffled random prompts of the table
    ``job.prompts`` (every lag in turn), written to ``job.out`` as JSON."""
    import json
    import sys

    import polars as pl

    from attnlab import induction, models, tables

    torch.set_num_threads(job.threads)
    head_scores = np.asarray(json.loads(open(job.profile).read())["head_scores"])
    df = tables.read(job.prompts, induction.ROW_COLUMNS)
    df = df.filter((pl.col("family") == "random") & ~pl.col("shuffled"))
    df = df.sort(["prompt", "lag"]).head(job.n_prompts)  # every lag in turn
    chosen = [InductionPrompt.from_row(r) for r in df.iter_rows(named=True)]
    net, _, _ = models.load(job.model)
    result = causal_check(
        net,
        chosen,
        head_scores,
        job.k,
        job.mode,
        job.draws,
        job.seed,
        job.bootstrap,
        job.batch_size,
    )
    result["model"] = job.model
    print(
        f"copy accuracy {result['baseline']:.3f}; top-{job.k} ablated {result['topk']:.3f}; "
        f"random-{job.k} ablated {result['random']:.3f}",
        file=sys.stderr,
    )
    tables.write_json(result, job.out)
