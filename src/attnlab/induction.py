"""Induction heads: prompts with repeated content, head scores, layer profiles.

A prompt is a beginning-of-sequence token followed by a segment repeated up to a fixed
length. Two families: ``random`` (a segment of ``lag`` distinct random ordinary tokens)
and ``names`` (a comma-separated list of first names). A copy operation is a query
position t in a second or later copy whose token equals the token ``lag`` positions
back (an exact token-id match) and occurs once in the segment; its source is
s = t - lag + 1, the token after the earlier occurrence. Queries in the first copy, and
BOS, never count. A head's induction score on a prompt is its mean attention from t to s
over the copy operations; its previous-token score, read at the same queries, is its mean
attention from t to t - 1.

At lag 2 the source s is t - 1, so a previous-token head scores as an induction head
there: the default lags start at 3, lag 2 is an opt-in that warns, and every stored
induction score has its previous-token score beside it.

``shuffled`` prompts are the null: every copy after the first is a fresh permutation of
the segment, so no copy structure remains, and the scores are read at the same (t, s).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from attnlab import attention
from attnlab.errors import UserError
from attnlab.jobs import InductionScores

NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene James Karen Louis Maria Nathan "
    "Olivia Peter Rachel Simon Teresa Victor Walter Laura Daniel Sarah Thomas Anna Paul "
    "Julia Mark Helen George Susan Robert Linda Edward Nancy Martin Diana Philip Ruth"
).split()


@dataclass
class InductionPrompt:
    family: str
    lag: int
    index: int
    shuffled: bool
    tokens: np.ndarray  # (T,) int64
    queries: np.ndarray  # (n,) positions t
    sources: np.ndarray  # (n,) positions s

    def to_row(self) -> dict:
        """The prompt as a table row (arrays as lists)."""
        row = {"family": self.family, "lag": self.lag, "prompt": self.index}
        row |= {"shuffled": self.shuffled, "tokens": self.tokens.tolist()}
        return row | {"queries": self.queries.tolist(), "sources": self.sources.tolist()}

    @classmethod
    def from_row(cls, row: dict) -> InductionPrompt:
        arrays = (np.asarray(row[k], dtype=np.int64) for k in ("tokens", "queries", "sources"))
        return cls(row["family"], row["lag"], row["prompt"], row["shuffled"], *arrays)


ROW_COLUMNS = ["family", "lag", "prompt", "shuffled", "tokens", "queries", "sources"]
SHORT_LAG = 8  # lags up to this are "short" in the lag split


def ordinary_tokens(tokenizer) -> np.ndarray:
    """Token ids that are not special and decode to a plain word piece, for random
    segments (special tokens excluded)."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(min(len(tokenizer), 30000)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if text.strip().isalpha() and text.isascii():
            ids.append(i)
    return np.asarray(ids, dtype=np.int64)


def _layout(segment: np.ndarray, seq_len: int, bos: int | None, rng, shuffled: bool):
    """Tokens, queries t and sources s of a segment tiled to ``seq_len`` after BOS. The
    copy operations are those of the unshuffled layout, so a shuffled prompt is read at
    the very positions its observed twin is."""
    lag = len(segment)
    head = np.asarray([] if bos is None else [bos], dtype=np.int64)
    n_copies = -(-(seq_len - len(head)) // lag)
    later = [rng.permutation(segment) if shuffled else segment for _ in range(n_copies - 1)]
    tokens = np.concatenate([head, segment, *later])[:seq_len].astype(np.int64)
    template = np.concatenate([head, np.tile(segment, n_copies)])[:seq_len]
    values, counts = np.unique(segment, return_counts=True)
    unique = set(values[counts == 1].tolist())
    q = np.asarray(
        [
            t
            for t in range(len(head) + lag, seq_len)
            if template[t] in unique and template[t] == template[t - lag]
        ],
        dtype=np.int64,
    )
    return tokens, q, q - lag + 1


def make_prompts(
    tokenizer,
    families: list[str],
    lags: list[int],
    seq_len: int,
    per_lag: int,
    seed: int,
    names_per_prompt: int = 8,
) -> list[InductionPrompt]:
    """Observed and shuffled (null) prompts of every family; deterministic in ``seed``.
    Lag 2 (s = t - 1: previous-token heads score as induction heads) is an opt-in that
    warns."""
    if min(lags) < 2:
        raise UserError("induction lags must be at least 2 (lag 1 makes s = t)")
    if 2 in lags:
        warnings.warn(
            "induction lag 2 reads s = t - 1: previous-token heads score as induction heads "
            "there (compare prev_score)",
            stacklevel=2,
        )
    if 2 * max(lags) + 1 > seq_len:
        raise UserError(f"seq_len {seq_len} is too short for two copies of lag {max(lags)}")
    rng = np.random.default_rng(seed)
    bos = tokenizer.bos_token_id
    pool = ordinary_tokens(tokenizer)
    prompts = []
    for family in families:
        for lag_i, lag in enumerate(lags if family == "random" else [0]):
            for i in range(per_lag):
                if family == "random":
                    segment = rng.choice(pool, size=lag, replace=False)
                elif family == "names":
                    names = rng.choice(NAMES, size=names_per_prompt, replace=False)
                    segment = np.asarray(
                        tokenizer(", ".join(names) + ", ", add_special_tokens=False)["input_ids"]
                    )
                else:
                    raise UserError(f"unknown induction family {family!r} (random, names)")
                for shuffled in (False, True):
                    sub = np.random.default_rng([seed, lag_i, i, int(shuffled), len(prompts)])
                    tokens, q, s = _layout(segment, seq_len, bos, sub, shuffled)
                    if len(q) == 0:
                        continue
                    prompts.append(InductionPrompt(family, len(segment), i, shuffled, tokens, q, s))
    return prompts


def prompt_scores(probs: torch.Tensor, prompts: list[InductionPrompt]) -> torch.Tensor:
    """Induction and previous-token scores of every head on each prompt, at the copy
    queries t: the mean attention from t to its source s, and from t to t - 1 (what a
    previous-token head does; at lag 2, s is t - 1 and the two coincide).
    probs: (B, H, T, T) for the B prompts. Returns (B, 2, H) float32: [induction, previous]."""
    out = torch.empty(len(prompts), 2, probs.shape[1])
    for b, p in enumerate(prompts):
        q = torch.as_tensor(p.queries, device=probs.device)
        s = torch.as_tensor(p.sources, device=probs.device)
        out[b, 0] = probs[b, :, q, s].mean(-1).float().cpu()
        out[b, 1] = probs[b, :, q, q - 1].mean(-1).float().cpu()
    return out


@torch.inference_mode()
def score_prompts(model, prompts: list[InductionPrompt], batch_size: int = 8, progress=None):
    """Per prompt, the (layers, heads) induction and previous-token scores. Yields
    (prompt, induction, previous)."""
    n_layers = model.config.num_hidden_layers
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = torch.as_tensor(np.stack([p.tokens for p in batch]), device=model.device)
        scores = torch.zeros(len(batch), 2, n_layers, model.config.num_attention_heads)

        def observe(layer, query, probs, batch=batch, scores=scores):
            scores[:, :, layer] = prompt_scores(probs, batch)

        with attention.observe(observe):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for p, s in zip(batch, scores.numpy(), strict=True):
            yield p, s[0], s[1]
        if progress is not None:
            progress.update(len(batch))


def layer_profile(scores: np.ndarray, how: str = "mean", quantile: float = 0.9) -> np.ndarray:
    """Per-layer profile of head scores (..., L, H): the mean over heads, or (``top``) the
    mean of the heads above the ``quantile`` of all heads' scores (0 where none)."""
    if how == "mean":
        return scores.mean(-1)
    if how != "top":
        raise UserError(f"unknown profile {how!r} (mean, top)")
    flat = scores.reshape(*scores.shape[:-2], -1)
    cut = np.quantile(flat, quantile, axis=-1)[..., None, None]
    above = scores >= cut
    total, count = np.where(above, scores, 0.0).sum(-1), above.sum(-1)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def peak_and_bandwidth(profile: np.ndarray) -> tuple[float, float]:
    """Peak relative depth (layer / layer count) and full width at half maximum, in
    relative depth, with linear interpolation between layers; profile: (L,)."""
    n = len(profile)
    k = int(np.argmax(profile))
    half = profile[k] / 2.0
    left, right = 0.0, float(n - 1)
    for i in range(k, 0, -1):
        if profile[i - 1] < half:
            left = i - 1 + (half - profile[i - 1]) / (profile[i] - profile[i - 1])
            break
    for i in range(k, n - 1):
        if profile[i + 1] < half:
            right = i + (profile[i] - half) / (profile[i] - profile[i + 1])
            break
    return k / n, (right - left) / n


def lag_confound(induction: np.ndarray, previous: np.ndarray, lags: np.ndarray, top: int = 5):
    """Per lag, how much the induction scores are previous-token scores: the heads'
    mean induction and previous-token scores, their Pearson r across heads, and how many
    of the ``top`` heads by induction score are also among the ``top`` by previous-token
    score. induction, previous: (prompts, L, H); lags: (prompts,). Returns {lag: dict}."""
    out = {}
    for lag in np.unique(lags):
        ind, prev = induction[lags == lag].mean(0), previous[lags == lag].mean(0)  # (L, H)
        top_ind = set(np.argsort(ind.ravel())[::-1][:top].tolist())
        top_prev = set(np.argsort(prev.ravel())[::-1][:top].tolist())
        out[int(lag)] = {
            "induction": ind.tolist(),
            "previous": prev.tolist(),
            "r": float(np.corrcoef(ind.ravel(), prev.ravel())[0, 1]),
            "top_shared": len(top_ind & top_prev),
            "top": top,
        }
    return out


def write_scores(job: InductionScores) -> None:
    """Make the induction prompts of every family and lag (``job.per_lag`` each,
    ``job.seq_len`` tokens) and score every head on each; write one row per (prompt,
    layer, head) to ``job.out`` and the prompts to ``job.prompts_out``."""
    import json
    import sys

    import pyarrow as pa
    from tqdm import tqdm

    from attnlab import models, tables

    info = json.loads(open(job.model_info).read())
    if job.seq_len > info["max_positions"]:
        raise UserError(
            f"induction seq_len {job.seq_len} exceeds the model's {info['max_positions']}"
        )
    torch.set_num_threads(job.threads)
    net, tokenizer, _ = models.load(job.model)
    attention.install(net)
    prompts = make_prompts(tokenizer, job.families, job.lags, job.seq_len, job.per_lag, job.seed)
    with tqdm(
        total=len(prompts),
        unit="prompt",
        desc=f"induction {job.model}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        scored = list(score_prompts(net, prompts, job.batch_size, bar))
    scores = np.stack([s for _, s, _ in scored])  # (prompts, layers, heads)
    previous = np.stack([s for _, _, s in scored])  # (prompts, layers, heads)
    n, cells = len(prompts), scores[0].size
    layer, head = np.indices(scores.shape[1:]).reshape(2, -1)
    per_prompt = {"family": "family", "lag": "lag", "prompt": "index", "shuffled": "shuffled"}
    rows = {k: np.repeat([getattr(p, f) for p in prompts], cells) for k, f in per_prompt.items()}
    rows |= {"layer": np.tile(layer, n), "head": np.tile(head, n)}
    rows["score"] = scores.ravel().astype(np.float64)
    rows["prev_score"] = previous.ravel().astype(np.float64)
    meta = {
        "model": job.model,
        "families": job.families,
        "lags": job.lags,
        "seq_len": job.seq_len,
        "per_lag": job.per_lag,
        "seed": job.seed,
        "n_layers": info["n_layers"],
        "n_heads": info["n_heads"],
    }
    tables.write(pa.table(rows), job.out, meta=meta)
    tables.write([p.to_row() for p in prompts], job.prompts_out, meta=meta)
