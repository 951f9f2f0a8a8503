"""Needle-in-a-haystack passkey retrieval under sparse-attention policies.

Prompts follow the passkey task of Mohtashami & Jaggi (2023): an instruction, filler
text, a needle "The pass key is NNNNN." at relative depth d of the filler, and a
question. The filler ("haystack") is either repeated sentences (``noise``, the paper's)
or a stretch of real text from the corpus shards (``corpus``), so the needle hides in
prose. Prompts are built from token ids segment by segment, so every prompt has
exactly the requested length and the needle's value tokens have known positions.
Retrieval is correct when the model, running under the policy, generates the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from attnlab import sparse
from attnlab.errors import UserError
from attnlab.policies.base import Policy

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class Prompt:
    """One passkey prompt: token ids and where the key's tokens sit."""

    length: int
    depth: float
    sample: int
    key: str
    input_ids: list[int]
    needle_positions: list[int]  # positions of the key's tokens in the first mention


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_prompt(
    tokenizer,
    length: int,
    depth: float,
    sample: int,
    seed: int,
    max_positions: int | None = None,
    haystack: np.ndarray | None = None,
) -> Prompt:
    """Build a prompt of exactly ``length`` tokens with the needle at ``depth`` in [0, 1].

    The key is a 5-digit number drawn from (seed, length, depth, sample), so a cell's
    prompts are the same for every model and policy. The needle is placed at the filler
    sentence boundary nearest to the requested depth. ``haystack``: token ids of a corpus
    (1-D); the filler is then a stretch of it starting at an offset drawn with the key.
    """
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"niah depth must be in [0, 1], got {depth}")
    if max_positions is not None and length > max_positions:
        raise UserError(
            f"niah length {length} exceeds the model's context of {max_positions} tokens"
        )
    rng = np.random.default_rng([seed, length, round(depth * 1000), sample])
    key = str(int(rng.integers(10_000, 100_000)))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + _ids(tokenizer, INSTRUCTION)
    before, after = NEEDLE.split("{key}", 1)
    needle_pre = _ids(tokenizer, before.rstrip())
    with_key = _ids(tokenizer, before + key)  # the key tokenized as it reads in the text
    if with_key[: len(needle_pre)] != needle_pre:
        raise UserError("the tokenizer merges the needle's text with its key; change NEEDLE")
    key_ids = with_key[len(needle_pre) :]
    needle_post = _ids(tokenizer, after.format(key=key))
    tail = _ids(tokenizer, QUESTION)
    n_filler = length - len(head) - len(needle_pre) - len(key_ids) - len(needle_post) - len(tail)
    if n_filler < 0:
        raise UserError(f"niah length {length} is too short for the prompt's fixed text")
    if haystack is None:
        unit = _ids(tokenizer, " " + FILLER)
        filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    else:
        if len(haystack) < n_filler:
            raise UserError(
                f"the corpus holds {len(haystack)} tokens, too few for a {length}-token "
                "haystack; raise corpus.max_chunks or shorten niah.lengths"
            )
        start = int(rng.integers(0, len(haystack) - n_filler + 1))
        filler = [int(t) for t in haystack[start : start + n_filler]]
    sentence_ends = [
        i + 1 for i, t in enumerate(filler) if tokenizer.decode([t]).rstrip().endswith(".")
    ]
    cut = min([0, *sentence_ends, n_filler], key=lambda i: abs(i - depth * n_filler))
    ids = head + filler[:cut] + needle_pre + key_ids + needle_post + filler[cut:] + tail
    start = len(head) + cut + len(needle_pre)
    return Prompt(length, depth, sample, key, ids, list(range(start, start + len(key_ids))))


def make_prompts(
    tokenizer,
    lengths,
    depths,
    samples: int,
    seed: int,
    max_positions: int | None = None,
    haystack: np.ndarray | None = None,
) -> list[Prompt]:
    return [
        make_prompt(tokenizer, n, d, s, seed, max_positions, haystack)
        for n in lengths
        for d in depths
        for s in range(samples)
    ]


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def score_prompt(
    model,
    tokenizer,
    prompt: Prompt,
    policy: Policy,
    sparsity: float,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """Generate greedily under the policy and score one prompt; returns one result row."""
    run = sparse.SparseRun(policy, sparsity, seed=seed, watch=prompt.needle_positions)
    ids = torch.tensor([prompt.input_ids], device=model.device)

    def enough(new: list[int]) -> bool:
        return len(digits(tokenizer.decode(new))) >= len(prompt.key)

    new = sparse.generate(model, ids, run, max_new_tokens, stop=enough)
    text = tokenizer.decode(new)
    return {
        "length": prompt.length,
        "depth": prompt.depth,
        "sample": prompt.sample,
        "key": prompt.key,
        "achieved_sparsity": run.achieved_sparsity,
        "correct": prompt.key in digits(text),
        "needle_kept": run.needle_kept,
        "generated": text,
    }


def score_niah(
    model,
    tokenizer,
    prompts: list[Prompt],
    policy: Policy,
    sparsity: float,
    max_new_tokens: int = 8,
    seed: int = 0,
    desc: str = "niah",
) -> list[dict]:
    """Score every prompt under one policy and target sparsity, with a progress bar."""
    rows = []
    for p in tqdm(prompts, desc=desc, unit="prompt", mininterval=5):
        rows.append(score_prompt(model, tokenizer, p, policy, sparsity, max_new_tokens, seed))
    return rows
