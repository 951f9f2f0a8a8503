"""Needle-in-a-haystack retrieval under sparse-attention policies.

The passkey task follows Mohtashami & Jaggi (2023): an instruction, filler text, a
needle "The pass key is NNNNN." at relative depth d of the filler, and a question. The
multi-needle tasks follow RULER's (Hsieh et al., 2024, arXiv:2404.06654): ``multikey``
hides several needles with different keys and asks for one, ``multivalue`` hides several
values of one key and asks for all, ``multiquery`` hides several keys and asks for all;
a prompt is correct only when every asked value is generated. All phrasing comes from
:class:`Templates` (config ``niah.templates``). The filler ("haystack") is either
repeated sentences (``noise``, the paper's) or a stretch of real text from the corpus
shards (``corpus``), so the needles hide in prose. Prompts are built from token ids
segment by segment, so every prompt has exactly the requested length and the asked
values' tokens have known positions. Retrieval is correct when the model, running
under the policy, generates every asked value. ``common_words`` (RULER's aggregation
task) is built by :mod:`attnlab.niah_tasks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from attnlab import decoding, niah_tasks, sparse
from attnlab.errors import UserError
from attnlab.policies.base import Policy

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASKS = ("passkey", "multikey", "multivalue", "multiquery", "common_words")


@dataclass(frozen=True)
class Templates:
    """The phrasing of every task (config ``niah.templates``). ``{value}`` marks where a
    needle's number goes (the first mention is the one tracked), ``{name}`` a key's
    name, ``{names}`` the asked names joined as "a, b and c"."""

    instruction: str = INSTRUCTION
    filler: str = FILLER
    passkey_needle: str = " The pass key is {value}. Remember it. {value} is the pass key."
    passkey_question: str = " What is the pass key? The pass key is"
    needle: str = " One of the special magic numbers for {name} is: {value}."
    question_one: str = (
        " What is the special magic number for {name}? The special magic number for {name} is:"
    )
    question_all: str = (
        " What are all the special magic numbers for {names}?"
        " The special magic numbers for {names} are:"
    )

    def __post_init__(self) -> None:
        need = {
            "passkey_needle": ("{value}",),
            "needle": ("{name}", "{value}"),
            "question_one": ("{name}",),
            "question_all": ("{names}",),
        }
        for key, marks in need.items():
            missing = [m for m in marks if m not in getattr(self, key)]
            if missing:
                raise UserError(f"niah.templates.{key} lacks {', '.join(missing)}")


@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt: token ids, the asked values, and where their tokens sit.

    ``key`` holds the values the question asks for, separated by spaces (one for
    passkey and multikey); ``needle_positions`` the positions of their tokens;
    ``haystack`` the filler's kind (``noise``, ``corpus``, or ``list``: common_words).
    """

    length: int
    depth: float
    sample: int
    key: str
    input_ids: list[int]
    needle_positions: list[int]
    task: str = "passkey"
    haystack: str = "noise"

    @property
    def answers(self) -> list[str]:
        return self.key.split()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _needle_ids(tokenizer, template: str, value: str, name: str = "") -> tuple[list[int], range]:
    """A needle's token ids and the offsets of its value's tokens (first mention)."""
    before, after = template.replace("{name}", name).split("{value}", 1)
    pre = _ids(tokenizer, before.rstrip())
    with_value = _ids(tokenizer, before + value)  # the value tokenized as it reads
    if with_value[: len(pre)] != pre:
        raise UserError(
            "the tokenizer merges a needle's text with its value; change niah.templates"
        )
    value_ids = with_value[len(pre) :]
    post = _ids(tokenizer, after.replace("{value}", value))
    return pre + value_ids + post, range(len(pre), len(pre) + len(value_ids))


def make_prompt(
    tokenizer,
    length: int,
    depth: float,
    sample: int,
    seed: int,
    max_positions: int | None = None,
    haystack: np.ndarray | None = None,
    task: str = "passkey",
    needles: int = 4,
    templates: Templates | None = None,
) -> Prompt:
    """Build a prompt of exactly ``length`` tokens with the (first asked) needle at
    ``depth`` in [0, 1] of the filler and any other needles at seeded random depths.

    Values are distinct 5-digit numbers drawn from (seed, length, depth, sample, task),
    so a cell's prompts are the same for every model and policy. Needles sit at the
    filler sentence boundaries nearest their depths. ``haystack``: token ids of a corpus
    (1-D); the filler is then a stretch of it starting at an offset drawn with the key.
    ``needles``: how many the multi-needle tasks hide (passkey hides one).
    """
    t = templates or Templates()
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"niah depth must be in [0, 1], got {depth}")
    if max_positions is not None and length > max_positions:
        raise UserError(
            f"niah length {length} exceeds the model's context of {max_positions} tokens"
        )
    if task != "passkey" and not 2 <= needles <= len(niah_tasks.NAMES):
        raise UserError(f"niah.needles must be in [2, {len(niah_tasks.NAMES)}], got {needles}")
    if task not in TASKS:
        raise UserError(f"unknown niah task {task!r}; known: {', '.join(TASKS)}")
    stream = [seed, length, round(depth * 1000), sample]
    if task != "passkey":  # the passkey prompts stay those of the single-task versions
        stream.append(TASKS.index(task))
    rng = np.random.default_rng(stream)
    if task == "common_words":  # the list is the haystack; depth only seeds it
        ids, positions, key = niah_tasks.build(tokenizer, length, needles, rng)
        return Prompt(length, depth, sample, key, ids, positions, task)
    spec, question = niah_tasks.needles(task, rng, 1 if task == "passkey" else needles, t)
    built = [(*_needle_ids(tokenizer, tmpl, v, name), v, asked) for tmpl, v, name, asked in spec]
    depths = [depth]
    if len(built) > 1:
        depths += [float(d) for d in rng.uniform(0.0, 1.0, size=len(built) - 1)]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + _ids(tokenizer, t.instruction)
    tail = _ids(tokenizer, question)
    n_filler = length - len(head) - sum(len(ids) for ids, *_ in built) - len(tail)
    if n_filler < 0:
        raise UserError(f"niah length {length} is too short for the prompt's fixed text")
    if haystack is None:
        unit = _ids(tokenizer, " " + t.filler)
        filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    else:
        if len(haystack) < n_filler:
            raise UserError(
                f"the corpus holds {len(haystack)} tokens, too few for a {length}-token "
                "haystack; raise corpus.max_chunks or shorten niah.lengths"
            )
        start = int(rng.integers(0, len(haystack) - n_filler + 1))
        filler = [int(x) for x in haystack[start : start + n_filler]]
    sentence_ends = [
        i + 1 for i, x in enumerate(filler) if tokenizer.decode([x]).rstrip().endswith(".")
    ]
    boundaries = [0, *sentence_ends, n_filler]
    cuts = [min(boundaries, key=lambda i, d=d: abs(i - d * n_filler)) for d in depths]
    ids, done, positions = list(head), 0, {}
    for i in sorted(range(len(built)), key=lambda i: (cuts[i], i)):
        needle_ids, offsets, value, asked = built[i]
        ids += filler[done : cuts[i]]
        done = cuts[i]
        if asked:
            positions[i] = [len(ids) + o for o in offsets]
        ids += needle_ids
    ids += filler[done:] + tail
    asked = sorted(positions)  # in the order the question asks
    key = " ".join(built[i][2] for i in asked)
    return Prompt(length, depth, sample, key, ids, [p for i in asked for p in positions[i]], task)


def make_prompts(
    tokenizer,
    lengths,
    depths,
    samples: int,
    seed: int,
    max_positions: int | None = None,
    haystack: np.ndarray | None = None,
    tasks=("passkey",),
    needles: int = 4,
    templates: Templates | None = None,
) -> list[Prompt]:
    return [
        make_prompt(tokenizer, n, d, s, seed, max_positions, haystack, task, needles, templates)
        for task in tasks
        for n in lengths
        for d in depths
        for s in range(samples)
    ]


def read_prompts(path) -> list[Prompt]:
    """The prompts of a prompts table (written by ``attnlab niah-prompts``)."""
    from attnlab import tables

    fields = list(Prompt.__dataclass_fields__)
    df = tables.read(path, fields).select(fields)
    return [Prompt(**r) for r in df.iter_rows(named=True)]


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _result(prompt: Prompt, run: sparse.SparseRun, text: str) -> dict:
    """One result row: the prompt, the run's regime and measured sparsity, the answer."""
    if prompt.task == "common_words":
        correct = niah_tasks.found(text, prompt.answers)
    else:
        correct = all(a in digits(text) for a in prompt.answers)
    return {
        "task": prompt.task,
        "haystack": prompt.haystack,
        "length": prompt.length,
        "depth": prompt.depth,
        "sample": prompt.sample,
        "key": prompt.key,
        "regime": run.regime.name,
        "decode": run.regime.decode_mode(run.decode),
        "selection": run.selection,
        "extension": run.regime.extends(run.policy),
        "achieved_sparsity": run.recorder.achieved_sparsity,
        "model_sparsity": run.recorder.model_sparsity,
        "correct": correct,
        "needle_kept": run.recorder.needle_kept,
        **_recall_columns(run),
        "generated": text,
    }


def _recall_columns(run: sparse.SparseRun) -> dict:
    """The run's attention-mass recall at its answering rows (see
    :meth:`attnlab.sparse.SparseRun.record_recall`): means over layers and heads, and the
    recall per layer; NaN and empty for full attention, which keeps everything."""
    by = run.recorder.recall_by_layer()
    mean = {k: float(sum(v) / len(v)) if v else float("nan") for k, v in by.items()}
    return {
        "attention_recall": mean["recall"],
        "oracle_overlap": mean["overlap"],
        "oracle_recall": mean["oracle"],
        "needle_recall": run.recorder.needle_recall,
        "recall_by_layer": by["recall"],
    }


def _stop(tokenizer, prompt: Prompt):
    """Stop once as many digits are out as the asked values hold (words: once all are)."""
    if prompt.task == "common_words":
        return lambda new: niah_tasks.found(tokenizer.decode(new), prompt.answers)
    n_digits = sum(len(a) for a in prompt.answers)
    return lambda new: len(digits(tokenizer.decode(new))) >= n_digits


def score_prompt(
    model,
    tokenizer,
    prompt: Prompt,
    policy: Policy,
    sparsity: float,
    max_new_tokens: int = 8,
    seed: int = 0,
    regime: str = "prefill",
    row_chunk: int = 0,
) -> dict:
    """Generate greedily under the policy in ``regime`` and score one prompt; returns one
    result row.

    ``max_new_tokens`` is the budget per asked value; generation stops once as many
    digits are out as the asked values hold. Correct: every asked value is among them.
    ``row_chunk``: prompt rows per attention call (:func:`attnlab.attention.chunked_attention`).
    """
    run = sparse.SparseRun(
        policy,
        sparsity,
        seed=seed,
        watch=prompt.needle_positions,
        regime=regime,
        row_chunk=row_chunk,
        whole_prompt=True,
    )
    ids = torch.tensor([prompt.input_ids], device=model.device)
    budget = max_new_tokens * len(prompt.answers)
    new = decoding.generate(model, ids, run, budget, stop=_stop(tokenizer, prompt))
    return _result(prompt, run, tokenizer.decode(new))


def score_niah(
    model,
    tokenizer,
    prompts: list[Prompt],
    policy: Policy,
    sparsity: float,
    max_new_tokens: int = 8,
    seed: int = 0,
    desc: str = "niah",
    regime: str = "prefill",
    row_chunk: int = 0,
) -> list[dict]:
    """Score every prompt under one policy and target sparsity, with a progress bar."""
    return [
        score_prompt(model, tokenizer, p, policy, sparsity, max_new_tokens, seed, regime, row_chunk)
        for p in tqdm(prompts, desc=desc, unit="prompt", mininterval=5)
    ]


def score_cache(
    model,
    tokenizer,
    prompts: list[Prompt],
    runs: list[tuple[str, Policy, float]],
    max_new_tokens: int = 8,
    seed: int = 0,
    desc: str = "niah cache",
    done: dict | None = None,
    keep=None,
) -> list[dict]:
    """Score every prompt under every ``(name, policy, sparsity)`` in the ``cache`` regime.
    ``done``: rows already scored, by :func:`prompt_id` (skipped here); ``keep(prompt,
    rows)`` is called with each prompt's rows once scored (a checkpoint).

    Each prompt's dense prefill runs once and is shared by every run
    (:func:`attnlab.decoding.generate_shared`); each run then decodes from it, the cache
    rewound after each. Rows carry ``policy`` (the name) and ``target_sparsity``.

    Full attention is one computation in both regimes (the dense prefill, then dense
    decoding), so a full-attention run here also gives full attention's ``prefill``-regime
    row: its text, with the prefill's own record (the prompt rows' sparsity, which the
    model's sliding windows set, and the last prompt row's needle).
    """
    from attnlab.policies.full import Full

    rows, done = [], done or {}
    for p in tqdm(prompts, desc=desc, unit="prompt", mininterval=5):
        if prompt_id(p) in done:
            rows += done[prompt_id(p)]
            continue
        ids = torch.tensor([p.input_ids], device=model.device)
        live = [
            sparse.SparseRun(policy, s, seed=seed, watch=p.needle_positions, regime="cache")
            for _, policy, s in runs
        ]
        leader = sparse.SparseRun(Full(), watch=p.needle_positions, regime="prefill")
        budget = max_new_tokens * len(p.answers)
        news = decoding.generate_shared(model, ids, live, budget, _stop(tokenizer, p), leader)
        scored = []
        for (name, policy, s), run, new in zip(runs, live, news, strict=True):
            text = tokenizer.decode(new)
            scored.append({"policy": name, "target_sparsity": s} | _result(p, run, text))
            if policy.name == "full":
                scored.append({"policy": name, "target_sparsity": s} | _result(p, leader, text))
        if keep is not None:
            keep(p, scored)
        rows += scored
    return rows


def prompt_id(p: Prompt) -> str:
    """A prompt's identity in a table: haystack, task, length, depth, sample."""
    return f"{p.haystack}/{p.task}/{p.length}/{p.depth}/{p.sample}"
