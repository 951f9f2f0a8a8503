"""Perplexity against latency: what a sparse policy costs in quality and buys in speed.

Each held-out corpus chunk of T tokens runs through the model once per repeat under the
policy (:class:`attnlab.sparse.SparseRun`), in one of two regimes (DESIGN: Regime):

- ``prefill``: every row under the policy in one teacher-forced pass (FlexAttention's
  block-sparse kernel for block policies on CUDA, masked fused or eager attention
  elsewhere); the NLL is summed over the predictions of tokens 1..T-1.
- ``cache``: the chunk's first C = round(context x T) tokens are the model's own dense
  prefill (untimed); the remaining rows run under the policy in one teacher-forced pass
  over that cache, as generated tokens would (a multi-row pass equals token-by-token
  decoding: tests/test_causality.py). The NLL is summed over the tokens those rows
  predict, C+1..T-1, the same tokens for every policy of the regime, full attention
  included.

Perplexity is the token-weighted mean, exp(sum NLL / tokens), and its interval comes
from a bootstrap over chunks. Two policies' intervals, each over the chunks on its own,
overlap even where every chunk is worse under one of them: the comparison is the paired
ratio to full attention of the same regime, exp(NLL/token under the policy - NLL/token
under full attention), with the chunks resampled jointly for both. Latency is the wall
time of the pass under the policy per row it computes, the median over every timed pass
after one untimed warm-up.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from attnlab import decoding, regimes, sparse
from attnlab.errors import UserError
from attnlab.jobs import AblationTable, ParetoScore, ParetoTable
from attnlab.policies.base import Policy
from attnlab.stats import cluster_bootstrap, percentile_interval

CHUNK_COLUMNS = ["chunk", "nll_sum", "tokens", "achieved_sparsity", "seconds_per_token"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_length(t: int, context: float) -> int:
    """Tokens of a T-token chunk densely prefilled in the ``cache`` regime: round(context
    x T), at least 1 and leaving at least two rows (one prediction) to the policy."""
    if not 0 < context < 1:
        raise UserError(f"pareto.context must be strictly between 0 and 1, got {context}")
    c = min(max(round(context * t), 1), t - 2)
    if c < 1:
        raise UserError(f"a chunk of {t} tokens is too short for the cache regime")
    return c


@torch.inference_mode()
def chunk_pass(
    model,
    ids: torch.Tensor,
    policy: Policy,
    sparsity: float,
    seed: int = 0,
    regime: str = "prefill",
    context: float = 0.5,
):
    """One teacher-forced pass of ``ids`` (1, T) under the policy in ``regime``.

    Returns (nll_sum, tokens, run, seconds): the summed next-token NLL in float64 of the
    predictions the policy's rows make, their count, the finished :class:`SparseRun` and
    the wall time of the pass under the policy.
    """
    run = sparse.SparseRun(policy, sparsity, seed=seed, regime=regime)
    first, cache = 0, None
    if run.regime.dense_prefill:  # the context's prefill dense, the policy's rows after it
        first = context_length(ids.shape[1], context)
        cache, _ = decoding.prefill(model, ids[:, :first], run)  # dense, not timed
    _sync(ids.device)
    t0 = time.perf_counter()
    with run:
        out = model(input_ids=ids[:, first:], past_key_values=cache, use_cache=cache is not None)
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    logits = out.logits[0, :-1].double()  # (T - first - 1, V)
    nll = torch.nn.functional.cross_entropy(logits, ids[0, first + 1 :], reduction="sum")
    return float(nll), logits.shape[0], run, seconds


def score_chunks(
    model,
    chunks: np.ndarray,
    policy: Policy,
    sparsity: float,
    repeats: int = 3,
    seed: int = 0,
    chunk_ids: Sequence[int] | None = None,
    desc: str = "perplexity",
    regime: str = "prefill",
    context: float = 0.5,
) -> list[dict]:
    """One row per chunk: NLL sum, tokens, achieved sparsity, median seconds per row
    under the policy, in ``regime`` (``context``: the cache regime's dense share).

    chunks: (N, T) token ids. Every chunk runs ``repeats`` times, all timed; the NLL and
    sparsity are those of the first (a pass is deterministic). The first chunk runs once
    more before, untimed.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = model.device
    chunk_ids = list(range(len(chunks))) if chunk_ids is None else list(chunk_ids)
    rows = []

    def one(tokens):
        ids = torch.as_tensor(tokens[None], dtype=torch.long, device=device)
        return chunk_pass(model, ids, policy, sparsity, seed, regime, context)

    one(chunks[0])
    for cid, tokens in zip(
        chunk_ids, tqdm(chunks, desc=desc, unit="chunk", mininterval=5), strict=True
    ):
        nll, n, run, seconds = one(tokens)
        times = [seconds] + [one(tokens)[3] for _ in range(repeats - 1)]
        rows.append(
            {
                "chunk": cid,
                "nll_sum": nll,
                "tokens": n,
                "achieved_sparsity": run.recorder.achieved_sparsity,
                "seconds_per_token": float(np.median(times)) / (n + 1),  # rows timed
            }
        )
    return rows


def perplexity(nll_sum: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted perplexity of chunks: exp(sum NLL / sum tokens)."""
    return math.exp(float(np.sum(nll_sum)) / float(np.sum(tokens)))


def perplexity_interval(
    nll_sum: np.ndarray, tokens: np.ndarray, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the perplexity, resampling whole chunks."""
    boot = cluster_bootstrap(np.stack([nll_sum, tokens], 1), resamples, seed)  # (R, 2)
    lo, hi = percentile_interval(np.exp(boot[:, 0] / boot[:, 1]))
    return float(lo), float(hi)


def paired_ratio(run, full, resamples: int = 2000, seed: int = 0) -> dict:
    """Perplexity of a run over that of full attention on the same chunks, with a
    percentile interval from a bootstrap that resamples chunks jointly for both (paired).
    run, full: polars frames of :data:`CHUNK_COLUMNS`, paired by ``chunk``."""
    both = run.join(full, on="chunk", suffix="_full")
    if both.height != run.height or both.height != full.height:
        raise UserError("a perplexity run and full attention scored different chunks")
    cols = ["nll_sum", "tokens", "nll_sum_full", "tokens_full"]
    per_chunk = both.select(cols).to_numpy().astype(float)  # (C, 4)

    def ratio(t):  # t: (..., 4) summed over chunks
        return np.exp(t[..., 0] / t[..., 1] - t[..., 2] / t[..., 3])

    lo, hi = percentile_interval(ratio(cluster_bootstrap(per_chunk, resamples, seed)))
    return {
        "ppl_ratio": float(ratio(per_chunk.sum(0))),
        "ratio_lo": float(lo),
        "ratio_hi": float(hi),
    }


def summarize(rows, resamples: int = 2000, seed: int = 0) -> dict:
    """Perplexity with its interval, median latency and achieved sparsity of a run's
    chunk rows (a polars frame with :data:`CHUNK_COLUMNS`)."""
    nll, tok = rows["nll_sum"].to_numpy(), rows["tokens"].to_numpy()
    lo, hi = perplexity_interval(nll, tok, resamples, seed)
    return {
        "perplexity": perplexity(nll, tok),
        "ppl_lo": lo,
        "ppl_hi": hi,
        "ms_per_token": 1e3 * float(rows["seconds_per_token"].median()),
        "achieved_sparsity": float(np.average(rows["achieved_sparsity"].to_numpy(), weights=tok)),
        "chunks": len(nll),
        "tokens": int(tok.sum()),
    }


def device_name(device: torch.device) -> str:
    """What the latencies were measured on: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


RUN_KEYS = ["model", "regime", "policy", "target_sparsity"]


def collect(paths: Sequence[str], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per (model, regime, policy, target sparsity) of pareto-score tables:
    perplexity with its interval, the paired ratio to full attention of the same model and
    regime with its interval (NaN without a full-attention run), latency, achieved
    sparsity, feasibility and the device."""
    import polars as pl

    from attnlab import tables

    df = tables.read_all(paths, [*CHUNK_COLUMNS, *RUN_KEYS, "feasible", "device"])
    rows = []
    for key, run in df.group_by(RUN_KEYS, maintain_order=True):
        model, regime = key[0], key[1]
        full = df.filter(
            (pl.col("model") == model) & (pl.col("regime") == regime) & (pl.col("policy") == "full")
        )
        nan = {"ppl_ratio": float("nan"), "ratio_lo": float("nan"), "ratio_hi": float("nan")}
        rows.append(
            dict(zip(RUN_KEYS, key, strict=True))
            | summarize(run, resamples, seed)
            | (paired_ratio(run, full, resamples, seed) if full.height else nan)
            | {
                "feasible": bool(run["feasible"].all()),
                "device": run["device"][0],
            }
        )
    return rows


def ablation(
    niah_paths: Sequence[str], pareto_paths: Sequence[str], resamples: int = 2000, seed: int = 0
) -> list[dict]:
    """One row per (model, regime, policy, target sparsity): NIAH accuracy over the
    prompts and perplexity over the chunks, each with a percentile bootstrap interval,
    the perplexity's paired ratio to full attention (:func:`paired_ratio`), and the
    attention-mass recall at the answering rows (mean over prompts, with its interval)
    beside the top-k oracle's at the same budget and the overlap with its keys.
    The regimes are those of the perplexity runs (a cache-regime NIAH table also holds
    full attention's prefill-regime rows)."""
    import polars as pl

    from attnlab import tables
    from attnlab.stats import bootstrap_ci

    ppl = {tuple(r[k] for k in RUN_KEYS): r for r in collect(pareto_paths, resamples, seed)}
    regimes = sorted({key[1] for key in ppl})
    recall = ["attention_recall", "oracle_recall", "oracle_overlap"]
    niah = tables.read_all(
        niah_paths, [*RUN_KEYS, "correct", "achieved_sparsity", "feasible", *recall]
    )
    niah = niah.filter(pl.col("regime").is_in(regimes))
    rows = []
    for key, run in niah.sort(RUN_KEYS, maintain_order=True).group_by(
        RUN_KEYS, maintain_order=True
    ):
        if key not in ppl:
            raise UserError(f"no perplexity run for {key} among the pareto tables")
        correct = run["correct"].cast(pl.Float64).to_numpy()
        lo, hi = bootstrap_ci(correct, resamples, seed=seed)
        kept = run["attention_recall"].to_numpy()
        rec_lo, rec_hi = bootstrap_ci(kept, resamples, seed=seed)  # NaN for full attention
        p = ppl[key]
        rows.append(
            dict(zip(RUN_KEYS, key, strict=True))
            | {
                "accuracy": float(correct.mean()),
                "acc_lo": lo,
                "acc_hi": hi,
                "prompts": len(correct),
                "niah_sparsity": float(run["achieved_sparsity"].mean()),
                "niah_feasible": bool(run["feasible"].all()),
                "recall": float(kept.mean()),
                "recall_lo": rec_lo,
                "recall_hi": rec_hi,
                "oracle_recall": float(run["oracle_recall"].mean()),
                "oracle_overlap": float(run["oracle_overlap"].mean()),
                "perplexity": p["perplexity"],
                "ppl_lo": p["ppl_lo"],
                "ppl_hi": p["ppl_hi"],
                "ppl_ratio": p["ppl_ratio"],
                "ratio_lo": p["ratio_lo"],
                "ratio_hi": p["ratio_hi"],
                "ppl_sparsity": p["achieved_sparsity"],
                "ppl_feasible": p["feasible"],
                "chunks": p["chunks"],
            }
        )
    return rows


def score_corpus(job: ParetoScore) -> None:
    """Perplexity and latency of one policy at one target sparsity on the corpus's last
    ``job.chunks`` chunks (held out: the capture reads the first), each timed
    ``job.repeats`` times, in ``job.regime`` (cache: perplexity of each chunk after its
    first ``job.context`` share, densely prefilled); write the rows to ``job.out``."""
    import hashlib
    from pathlib import Path

    from attnlab import scoring, tables
    from attnlab.corpus import read_corpus

    regime = regimes.named(job.regime)
    tokens = read_corpus(job.manifest)
    if not 0 < job.chunks <= len(tokens):
        raise UserError(
            f"pareto.chunks is {job.chunks} but the corpus holds {len(tokens)} chunks; "
            "raise corpus.max_chunks or lower pareto.chunks"
        )
    first = len(tokens) - job.chunks
    run_of = (job.policy, job.policy_params, job.sparsity)
    run, target, net, _ = scoring.load_job(job, *run_of, whole_prompt=False)
    rows = score_chunks(
        net,
        tokens[first:],
        run,
        target,
        job.repeats,
        job.seed,
        chunk_ids=range(first, len(tokens)),
        desc=f"{job.model} {job.policy} {target:g} {job.regime}",
        regime=job.regime,
        context=job.context,
    )
    device_used = device_name(net.device)
    marks = scoring.mark_rows(rows, job.model, job.policy, run, target, job.tolerance)
    for r in rows:
        r.update(device=device_used, regime=job.regime)
    meta = {
        "model": job.model,
        **marks,
        "regime": job.regime,
        "context": job.context if regime.dense_prefill else None,
        "manifest_sha256": hashlib.sha256(Path(job.manifest).read_bytes()).hexdigest(),
        "repeats": job.repeats,
        "threads": job.threads,
        "device": device_used,
    }
    tables.write(rows, job.out, meta=meta)


def write_table(job: ParetoTable) -> None:
    """One row per run of the pareto-score tables ``job.inputs`` (:func:`collect`)."""
    from attnlab import tables

    rows = collect(job.inputs, job.resamples, job.seed)
    tables.write(rows, job.out, meta=tables.meta(job.inputs[0]) | {"inputs": job.inputs})


def write_ablation(job: AblationTable) -> None:
    """The ablation table (:func:`ablation`) of the NIAH tables ``job.niah`` and the
    pareto-score tables ``job.pareto``."""
    from attnlab import tables

    rows = ablation(job.niah, job.pareto, job.resamples, job.seed)
    meta = {"niah": job.niah, "pareto": job.pareto, "resamples": job.resamples}
    tables.write(rows, job.out, meta=meta)
