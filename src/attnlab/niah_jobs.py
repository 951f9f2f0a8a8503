"""The needle-in-a-haystack stage's verbs: one model's prompts, their scores in a regime
(every cache-regime run over one dense prefill per prompt, or one prefill-regime run), and
the one table."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from attnlab import models, niah, regimes, scoring, tables
from attnlab.errors import UserError
from attnlab.jobs import NiahPrompts, NiahScore, NiahTable, shard_of
from attnlab.policies.selection import twilight


def write_prompts(job: NiahPrompts) -> None:
    """The prompts of every (haystack, task, length, depth, sample) in the model's
    tokenizer. ``haystack``: ``noise`` and/or ``corpus`` (then ``corpus`` is the corpus
    manifest); a cell's keys are the same on every haystack. ``common_words`` prompts (a
    list, no filler) are made once, haystack ``list``. ``templates``: the fields of
    :class:`attnlab.niah.Templates`."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    info = json.loads(open(job.model_info).read())
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(job.model))
    haystack = [job.haystack] if isinstance(job.haystack, str) else job.haystack
    haystacks = list(dict.fromkeys(haystack))
    fillers = {"noise": None}
    if "corpus" in haystacks:
        from attnlab.corpus import read_corpus

        if job.corpus is None:
            raise UserError("the corpus haystack needs --corpus (the corpus manifest)")
        fillers["corpus"] = read_corpus(job.corpus).reshape(-1)
    if unknown := [t for t in job.tasks if t not in niah.TASKS]:
        raise UserError(f"no task {unknown[0]!r}: the tasks are {', '.join(niah.TASKS)}")
    try:
        phrasing = niah.Templates(**job.templates)
    except TypeError as e:
        raise UserError(f"niah.templates: {e}") from e
    # common_words' list is its own haystack ("list"): built once, not once per filler
    per_filler = [t for t in job.tasks if t != "common_words"]
    plan = [(name, fillers[name], per_filler) for name in haystacks]
    if "common_words" in job.tasks:
        plan.append(("list", None, ["common_words"]))
    grid = (job.lengths, job.depths, job.samples, job.seed, info["max_positions"])
    prompts = [
        replace(p, haystack=name)
        for name, filler, its_tasks in plan
        for p in niah.make_prompts(tokenizer, *grid, filler, its_tasks, job.needles, phrasing)
    ]
    rows = [dict(p.__dict__, model=job.model) for p in prompts]
    meta = {
        "model": job.model,
        "seed": job.seed,
        "haystack": " ".join(haystacks),
        "tasks": job.tasks,
        "needles": job.needles,
        "templates": phrasing.__dict__,
    }
    tables.write(rows, job.out, meta=meta)


def score(job: NiahScore) -> None:
    """Score the prompts under the record's runs in its regime (:mod:`attnlab.regimes`)
    and write the rows to ``job.out``. In the ``cache`` regime every run shares one dense
    prefill per prompt (full attention first: its rows are both regimes'), the prompts i,
    i + n, ... of shard ``<i>of<n>`` (from 1) only, so that n jobs share the card; in the
    ``prefill`` regime one run scores every prompt, its prompt rows under the policy and
    its answer decoded densely."""
    if regimes.named(job.regime).dense_prefill:
        _score_cache(job)
    elif len(job.runs) != 1 or job.shard != "1of1":
        raise UserError("the prefill regime scores one run over every prompt in a job")
    else:
        _score_prefill(job, *job.runs[0])


def _score_prefill(job: NiahScore, policy: str, params: dict, sparsity: float) -> None:
    rows_in = niah.read_prompts(job.prompts)
    pmeta = tables.meta(job.prompts)
    run, target, net, tokenizer = scoring.load_job(job, policy, params, sparsity)
    rows = niah.score_niah(
        net,
        tokenizer,
        rows_in,
        run,
        target,
        job.max_new_tokens,
        job.seed,
        desc=f"{job.model} {policy} {target:g} prefill",
        regime="prefill",
        row_chunk=job.row_chunk,
    )
    marks = scoring.mark_rows(rows, job.model, policy, run, target, job.tolerance)
    params = json.dumps(run.params(), sort_keys=True)
    cost = choice_read_cost(run, models.model_info(job.model, net).head_dim, target)
    for r in rows:
        r.update(policy_params=params, read_cost=cost)
    meta = {**pmeta, **marks, "regime": "prefill", "decode": "dense", "row_chunk": job.row_chunk}
    tables.write(rows, job.out, meta=meta)
    scoring.log_gpu_peak(job.device)


def _score_cache(job: NiahScore) -> None:
    part, parts = shard_of(job.shard)
    rows_in = niah.read_prompts(job.prompts)[part - 1 :: parts]
    pmeta = tables.meta(job.prompts)
    made = []
    for name, params, target in job.runs:
        made.append((name, *scoring.make_policy(name, params, target)))
    net, tokenizer, info = scoring.load_model(job)  # after the policies: a bad one fails first
    settings = [job.model, job.runs, job.shard, job.max_new_tokens, job.seed, job.device]
    checkpoint = Checkpoint(job.out, [*settings, job.dtype], job.prompts)
    rows = niah.score_cache(
        net,
        tokenizer,
        rows_in,
        made,
        job.max_new_tokens,
        job.seed,
        desc=f"{job.model} cache ({len(made)} runs)",
        done=checkpoint.load(),
        keep=checkpoint.keep,
    )
    params = {name: json.dumps(p.params(), sort_keys=True) for name, p, _ in made}
    cost = {(name, s): choice_read_cost(p, info.head_dim, s) for name, p, s in made}
    for r in rows:
        r.update(
            model=job.model,
            feasible=r["achieved_sparsity"] >= r["target_sparsity"] - job.tolerance,
            policy_params=params[r["policy"]],
            read_cost=cost[r["policy"], r["target_sparsity"]],
        )
    meta = {
        **pmeta,
        "regime": "cache",
        "runs": job.runs,
        "tolerance": job.tolerance,
        "shard": job.shard,
    }
    tables.write(rows, job.out, meta=meta)
    checkpoint.path.unlink(missing_ok=True)
    scoring.log_gpu_peak(job.device)


class Checkpoint:
    """Each prompt's rows of a long job, appended to ``<out>.partial-<digest>.jsonl`` as it
    is scored, so a job killed midway and run again scores only the prompts it had not
    finished. The digest covers the job's settings, the prompts table and the package's
    source, so rows of other settings or other code are never reused."""

    def __init__(self, out: str, settings: list, prompts: str) -> None:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(Path(prompts).read_bytes())
        for src in sorted(Path(__file__).parent.rglob("*.py")):
            h.update(src.read_bytes())
        self.path = Path(f"{out}.partial-{h.hexdigest()[:16]}.jsonl")

    def load(self) -> dict[str, list[dict]]:
        """The rows already scored, by prompt (a last line cut short by a kill is ignored)."""
        done = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[entry["prompt"]] = entry["rows"]
        if done:
            print(f"resuming: {len(done)} prompts already scored in {self.path}", flush=True)
        return done

    def keep(self, prompt, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"prompt": niah.prompt_id(prompt), "rows": rows}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def join_tables(job: NiahTable) -> None:
    """The score tables ``job.inputs`` as one table (the first one's metadata, and the
    inputs' names)."""
    df = tables.read_all(job.inputs)
    meta = tables.meta(job.inputs[0]) | {
        "inputs": job.inputs,
        "full_attention": "both regimes' rows from the cache job: one dense prefill and decoding",
    }
    tables.write(df.to_arrow(), job.out, meta=meta)


def choice_read_cost(policy, head_dim: int, sparsity: float) -> float:
    """The share of the keys' bytes a row reads to choose (the tables' ``read_cost``): the
    policy's own, and with Twilight's ``top_p`` the budget's keys, read to prune them
    (whole here; the paper reads them at 4 bits)."""
    cost = policy.read_cost(head_dim, sparsity)
    return cost + (1.0 - sparsity) if twilight(policy) else cost
