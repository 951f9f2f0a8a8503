"""Passkey prompts: exact length, needle where asked, refusals, and scoring of a real model."""

import pytest

from attnlab import niah, policies
from attnlab.errors import UserError


@pytest.mark.parametrize("length", [300, 777])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_exact_length_and_tracked_needle(smollm2, length, depth):
    _, tok, _ = smollm2
    p = niah.make_prompt(tok, length, depth, sample=0, seed=7)
    assert len(p.input_ids) == length
    assert tok.decode([p.input_ids[i] for i in p.needle_positions]).strip() == p.key
    before = tok.decode(p.input_ids[p.needle_positions[0] - 5 : p.needle_positions[0]])
    assert before.rstrip().endswith("pass key is")
    rel = p.needle_positions[0] / length
    assert abs(rel - depth) < 0.2


def test_needle_moves_with_depth_and_keys_are_seeded(smollm2):
    _, tok, _ = smollm2
    pos = [niah.make_prompt(tok, 600, d, 0, 1).needle_positions[0] for d in (0.0, 0.5, 1.0)]
    assert pos[0] < pos[1] < pos[2]
    a, b = niah.make_prompt(tok, 600, 0.5, 0, 1), niah.make_prompt(tok, 600, 0.5, 1, 1)
    assert a.key == niah.make_prompt(tok, 600, 0.5, 0, 1).key and a.key != b.key


def test_prompt_longer_than_context_is_refused(smollm2):
    _, tok, info = smollm2
    with pytest.raises(UserError, match="exceeds the model's context of 8192"):
        niah.make_prompt(tok, 9000, 0.5, 0, 0, info.max_positions)
    with pytest.raises(UserError, match="too short"):
        niah.make_prompt(tok, 20, 0.5, 0, 0)


def test_score_prompt_retrieves_with_full_attention_and_records_diagnostics(gemma3):
    model, tok, _ = gemma3
    p = niah.make_prompt(tok, 400, 0.5, 0, 0)
    row = niah.score_prompt(model, tok, p, policies.make("full"), 0.0)
    assert row["correct"] and p.key in niah.digits(row["generated"])
    assert row["needle_kept"] == 1.0 and row["achieved_sparsity"] == 0.0
    row = niah.score_prompt(model, tok, p, policies.make("streamingllm"), 0.95)
    assert row["needle_kept"] == 0.0  # the needle sits mid-prompt: outside sinks and window
    assert row["achieved_sparsity"] > 0.9


def test_the_topk_oracle_retrieves_in_the_cache_regime_at_99_percent(gemma3):
    """A check with a known answer for the cache regime: the oracle keeps each generated
    token's highest-scoring keys, so where full attention retrieves the passkey it does
    too, even at 99%; StreamingLLM, whose window misses a mid-prompt needle, does not.
    One shared prefill serves all three runs."""
    model, tok, _ = gemma3
    p = niah.make_prompt(tok, 1024, 0.5, 0, 0)
    runs = [
        ("full", policies.make("full"), 0.0),
        ("topk", policies.make("topk"), 0.99),
        ("streamingllm", policies.make("streamingllm"), 0.9),
    ]
    out = niah.score_cache(model, tok, [p], runs)
    rows = {r["policy"]: r for r in out if r["regime"] == "cache"}
    assert rows["full"]["correct"] and rows["topk"]["correct"]
    assert abs(rows["topk"]["achieved_sparsity"] - 0.99) < 0.005
    assert not rows["streamingllm"]["correct"] and rows["streamingllm"]["needle_kept"] == 0.0
    # full attention is one computation in both regimes: the shared prefill's own record
    # is its prefill-regime row, as a prefill-regime run of its own gives it
    (shared,) = [r for r in out if r["regime"] == "prefill"]
    alone = niah.score_prompt(model, tok, p, policies.make("full"), 0.0, regime="prefill")
    assert shared["policy"] == "full" and shared["generated"] == alone["generated"]
    for key in ("achieved_sparsity", "model_sparsity", "needle_kept", "decode"):
        assert shared[key] == alone[key], key
    assert shared["achieved_sparsity"] > 0.1  # Gemma's sliding windows over the prompt rows


@pytest.mark.parametrize("task", ["multikey", "multivalue", "multiquery"])
def test_multi_needle_prompts_track_every_asked_value(smollm2, task):
    _, tok, _ = smollm2
    p = niah.make_prompt(tok, 700, 0.25, 0, 5, task=task, needles=4)
    assert len(p.input_ids) == 700 and p.task == task
    text = tok.decode(p.input_ids)
    assert text.count("special magic number") == 4 + 2  # four needles, the question twice
    asked = p.answers
    assert len(asked) == (1 if task == "multikey" else 4) and len(set(asked)) == len(asked)
    per = len(p.needle_positions) // len(asked)
    for i, value in enumerate(asked):
        pos = p.needle_positions[i * per : (i + 1) * per]
        assert tok.decode([p.input_ids[j] for j in pos]).strip() == value
    question = text[text.rindex("What") :]
    if task == "multiquery":
        assert question.count(",") + question.count(" and ") >= 3
    assert p == niah.make_prompt(tok, 700, 0.25, 0, 5, task=task, needles=4)


def test_the_config_schema_offers_every_task():
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas/config.schema.yaml").read_text())
    tasks = schema["properties"]["niah"]["properties"]["tasks"]["items"]["enum"]
    assert tasks == list(niah.TASKS)


def test_passkey_prompts_are_unchanged_by_the_tasks_and_templates_are_config(smollm2):
    _, tok, _ = smollm2
    p = niah.make_prompt(tok, 500, 0.5, 0, 1)
    assert niah.make_prompts(tok, [500], [0.5], 1, 1)[0] == p and p.task == "passkey"
    t = niah.Templates(passkey_needle=" The code word is {value}.", passkey_question=" Code:")
    q = niah.make_prompt(tok, 500, 0.5, 0, 1, templates=t)
    assert q.key == p.key and "The code word is" in tok.decode(q.input_ids)
    assert tok.decode([q.input_ids[i] for i in q.needle_positions]).strip() == q.key
    with pytest.raises(UserError, match="needle lacks"):
        niah.Templates(needle=" The number is {value}.")


def test_multikey_is_retrieved_with_full_attention_and_scored_on_every_value(gemma3):
    model, tok, _ = gemma3
    p = niah.make_prompt(tok, 400, 0.5, 0, 0, task="multikey", needles=3)
    row = niah.score_prompt(model, tok, p, policies.make("full"), 0.0)
    assert row["task"] == "multikey" and row["correct"], row["generated"]
    q = niah.make_prompt(tok, 400, 0.5, 0, 0, task="multivalue", needles=3)
    row = niah.score_prompt(model, tok, q, policies.make("full"), 0.0)
    found = [v in niah.digits(row["generated"]) for v in q.answers]
    assert row["correct"] == all(found)


def test_a_cache_job_killed_midway_scores_only_the_prompts_it_had_not_finished(smollm2, tmp_path):
    """The cache job (every cache-regime run over one dense prefill per prompt, the
    study's longest) keeps each prompt's rows as it goes: run again after a kill, it takes
    the finished prompts' rows from its checkpoint (a last line cut short ignored) and
    scores the rest; other settings never read that checkpoint; a finished job leaves
    none behind."""

    import polars as pl

    from attnlab import niah_jobs, tables
    from attnlab.jobs import NiahScore

    _, tok, _ = smollm2
    prompts = niah.make_prompts(tok, [96], [0.0, 1.0], 1, 0)
    tables.write([p.__dict__ for p in prompts], tmp_path / "prompts.parquet")
    runs = [["full", {}, 0.0], ["topk", {}, 0.5]]
    out = str(tmp_path / "cache.parquet")
    job = NiahScore(
        model="smollm2-135m",
        prompts=str(tmp_path / "prompts.parquet"),
        regime="cache",
        runs=runs,
        row_chunk=0,
        shard="1of1",
        tolerance=0.01,
        max_new_tokens=4,
        seed=0,
        threads=1,
        device="cpu",
        dtype="auto",
        out=out,
    )
    niah_jobs.score(job)
    whole = pl.read_parquet(out)
    assert not list(tmp_path.glob("*.partial-*"))

    settings = ["smollm2-135m", runs, "1of1", 4, 0, "cpu", "auto"]
    checkpoint = niah_jobs.Checkpoint(out, settings, job.prompts)
    first = niah.prompt_id(prompts[0])
    kept = [dict(r, generated="from the checkpoint") for r in whole.to_dicts()[:3]]
    ids = {f"{r['haystack']}/{r['task']}/{r['length']}/{r['depth']}/{r['sample']}" for r in kept}
    assert ids == {first}
    checkpoint.keep(prompts[0], kept)
    with checkpoint.path.open("a") as f:
        f.write('{"prompt": "cut sho')  # the kill
    other = niah_jobs.Checkpoint(out, [*settings[:4], 1, "cpu", "auto"], job.prompts)
    assert other.path != checkpoint.path and not other.load()
    niah_jobs.score(job)
    resumed = pl.read_parquet(out)
    assert resumed["generated"].to_list()[:3] == ["from the checkpoint"] * 3
    assert resumed.drop("generated")[3:].equals(whole.drop("generated")[3:])
    assert resumed["generated"][3:].equals(whole["generated"][3:])
    assert not checkpoint.path.exists()


@pytest.mark.parametrize("length", [1024, 2000])
def test_common_words_list_has_exact_length_and_counts(smollm2, length):
    """RULER's aggregation task: a list of exactly ``length`` tokens in which each asked
    word appears 30 times, at the tracked positions, and every other word at most 3 times;
    the same cell gives the same list; an answer naming the asked words in any case and
    order is correct, one missing a word is not."""
    from collections import Counter

    from attnlab import niah_tasks

    _, tok, _ = smollm2
    p = niah.make_prompt(tok, length, 0.5, 0, 7, task="common_words", needles=3)
    assert len(p.input_ids) == length and p.task == "common_words"
    words = p.answers
    assert len(words) == 3 and len(p.needle_positions) == 3 * niah_tasks.COMMON
    assert sorted(tok.decode([p.input_ids[i]]).strip() for i in p.needle_positions) == sorted(
        w for w in words for _ in range(niah_tasks.COMMON)
    )
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    assert text.startswith(niah_tasks.HEAD) and text.endswith("in the list are:")
    listed = Counter(text.split("?")[0].split())
    assert all(listed[w] == niah_tasks.COMMON for w in words)
    others = [n for w, n in listed.items() if w not in words and w.isalpha() and w.islower()]
    assert others and max(others) <= niah_tasks.RARE
    assert niah.make_prompt(tok, length, 0.5, 0, 7, task="common_words", needles=3) == p
    assert niah.make_prompt(tok, length, 0.5, 1, 7, task="common_words", needles=3).key != p.key
    answer = " " + ", ".join(w.capitalize() for w in reversed(words)) + "."
    assert niah_tasks.found(answer, words) and not niah_tasks.found(answer, [*words, "zzzz"])


def test_common_words_too_short_is_refused(smollm2):
    _, tok, _ = smollm2
    with pytest.raises(UserError, match="common_words: 300 tokens hold"):
        niah.make_prompt(tok, 300, 0.5, 0, 7, task="common_words", needles=4)


def test_common_words_lists_are_made_once_whatever_the_fillers(tmp_path):
    """A list has no filler: asked beside passkey on the noise haystack, the common-words
    prompt is made once and labelled ``list``, the passkey prompt ``noise``."""
    import json

    import polars as pl

    from attnlab import niah_jobs
    from attnlab.jobs import NiahPrompts

    info = tmp_path / "info.json"
    info.write_text(json.dumps({"max_positions": 8192}))
    out = tmp_path / "prompts.parquet"
    grid = dict(lengths=[1024], depths=[0.5], samples=1, seed=0, needles=3, templates={})
    job = NiahPrompts(
        model="smollm2-135m",
        model_info=str(info),
        haystack=["noise", "noise"],
        tasks=["passkey", "common_words"],
        out=str(out),
        **grid,
    )
    niah_jobs.write_prompts(job)
    df = pl.read_parquet(out)
    assert df.select("task", "haystack").rows() == [("passkey", "noise"), ("common_words", "list")]
