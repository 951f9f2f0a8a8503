"""One record per verb: everything a stage's job runs with, as one frozen dataclass.

Each command of ``attnlab`` (:mod:`attnlab.cli`) calls its verb with one record of
:data:`RECORDS`. A field is a *setting*, read from the validated config at the key its
metadata names (``setting("niah.max_new_tokens")``; ``{policy}`` in a key is the record's
own ``policy``; ``policy_params.<name>``, a used policy's every parameter, is the
effective config's, :func:`attnlab.workflow.policy_params`), or *given* per job: a file,
a wildcard's value.

The config schema (``schemas/config.schema.yaml``) is the one source of the settings'
defaults, and the records are not its generator: it says more than a type (allowed
values, ranges, the description every key's documentation is generated from, ``attnlab
config --table``), and Snakemake validates a config against it before any rule runs.

A rule fills its record with :func:`job_json` (the Snakefile's ``job`` helper): every
setting from the validated config and what the rule gives from its wildcards, as one JSON
argument ``--job``; files go as flags, as a person types them, and so do threads (a
setting, which the scheduler's ``--threads`` overrides). By hand, flags name any field;
the settings not given come from the effective config (``workflow_config.yaml`` in the
working directory and any ``--configfile``, ``attnlab config``), the given ones are
checked against the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from attnlab.errors import UserError
from attnlab.record import RECORDS, Job, given, setting

MODEL = "smollm2-135m, gemma3-270m (installed), a GGUF file or a Hugging Face id"


def job_json(command: str, config: dict, **given) -> str:
    """A rule's ``--job``: the record's settings from the validated ``config`` and what the
    rule gives (wildcards' values), as JSON. Threads are left to the ``--threads`` flag
    (the scheduler's count), files to theirs."""
    record = RECORDS[command]
    values = {**record.settings(config, given), **given}
    values.pop("threads", None)
    return json.dumps(values, sort_keys=True)


# The shared part of the jobs that load a model.


@dataclass(frozen=True, kw_only=True)
class ModelJob(Job):
    model: str = given(MODEL)
    threads: int = setting("threads")


@dataclass(frozen=True, kw_only=True)
class DeviceJob(ModelJob):
    device: str = setting("device")
    dtype: str = setting("dtype")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Job):
    """load a model once (builds the cache), write its geometry"""

    command = "model-info"
    model: str = given(MODEL)
    out: str = given("the geometry, JSON")


@dataclass(frozen=True, kw_only=True)
class NiahPrompts(Job):
    """passkey prompts for one model's tokenizer"""

    command = "niah-prompts"
    model: str = given(MODEL)
    model_info: str = given("the model's geometry (model-info)")
    corpus: str | None = given("the corpus manifest, for the corpus haystack", default=None)
    out: str = given("the prompts table")
    lengths: list[int] = setting("niah.lengths")
    depths: list[float] = setting("niah.depths")
    samples: int = setting("niah.samples")
    haystack: str | list[str] = setting("niah.haystack")
    tasks: list[str] = setting("niah.tasks")
    needles: int = setting("niah.needles")
    templates: dict = setting("niah.templates")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class NiahScore(DeviceJob):
    """score prompts in one regime: every cache-regime run over one prefill, or one run"""

    command = "niah-score"
    prompts: str = given("the prompts table (niah-prompts)")
    out: str = given("the scores table")
    regime: str = given("cache or prefill (attnlab.regimes)")
    runs: list = given(
        "JSON [[policy, params, sparsity], ...]: the cache regime's every run, full"
        " attention first; the prefill regime's one run"
    )
    shard: str = given("<i>of<n>: the i-th of n interleaved parts of the prompts", default="1of1")
    tolerance: float = setting("niah.sparsity_tolerance")
    max_new_tokens: int = setting("niah.max_new_tokens")
    row_chunk: int = setting("niah.row_chunk")  # the prefill regime's (the rule gives 0 else)


@dataclass(frozen=True, kw_only=True)
class NiahTable(Job):
    """concatenate NIAH score tables"""

    command = "niah-table"
    inputs: list[str] = given("score tables (niah-score)")
    out: str = given("the one table")


@dataclass(frozen=True, kw_only=True)
class NiahPaired(Job):
    """each policy's accuracy against full attention and the best other"""

    command = "niah-paired"
    table: str = given("a NIAH table (niah-table)")
    out: str = given("the paired comparisons")
    resamples: int = setting("niah.bootstrap")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class NiahMatched(Job):
    """each policy's highest sparsity keeping 90% of full's answers"""

    command = "niah-matched"
    table: str = given("a NIAH table (niah-table)")
    decode: str = given("an attnlab bench decode table (csv or parquet)")
    prefill: str | None = given("an attnlab bench prefill table", default=None)
    generate: str | None = given("an attnlab bench generate table", default=None)
    out: str = given("the matched table")
    fig: str = given("its figure")


@dataclass(frozen=True, kw_only=True)
class CorpusShard(Job):
    """filter, tokenize and chunk a corpus into shards"""

    command = "corpus-shard"
    model: str = given("the model whose tokenizer cuts the chunks")
    shards: str = given("directory of the shards")
    manifest: str = given("the manifest, JSON")
    source: str = setting("corpus.source")
    split: str = setting("corpus.split")
    keep_sets: list[str] = setting("corpus.keep_sets")
    chunk_len: int = setting("corpus.chunk_len")
    max_chunks: int = setting("corpus.max_chunks")
    shard_size: int = setting("corpus.shard_size")


@dataclass(frozen=True, kw_only=True)
class Capture(ModelJob):
    """per-token attention metrics and Q/K of a corpus"""

    command = "capture"
    manifest: str = given("the corpus stage's manifest.json")
    metrics: str = given("directory: one Parquet file per shard")
    qk: str = given("directory: one Arrow IPC file per shard")
    chunks: int = setting("capture.chunks")
    batch_size: int = setting("capture.batch_size")
    mass: float = setting("capture.mass")
    qk_layers: list[int] = setting("capture.layers")
    qk_chunks: int = setting("capture.qk_chunks")
    device: str = setting("device")
    dtype: str = setting("dtype")


@dataclass(frozen=True, kw_only=True)
class InterventionHeads(Job):
    """resolve the target and control heads"""

    command = "intervention-heads"
    model: str = given(MODEL)
    capture_metrics: str | None = given("capture tables, where a head is auto", default=None)
    out: str = given("heads.json")
    target: str = setting("intervention.target")
    control: str = setting("intervention.control")
    resamples: int = setting("capture.bootstrap")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class Intervention(ModelJob):
    """query-scaling sweep of one head"""

    command = "intervention"
    manifest: str = given("the corpus stage's manifest.json")
    heads: str = given("heads.json from intervention-heads")
    head: str = given("L<layer>H<head>")
    out: str = given("the sweep table")
    scales: list[float] = setting("intervention.scales")
    chunks: int = setting("intervention.chunks")
    batch_size: int = setting("intervention.batch_size")
    mass: float = setting("capture.mass")


@dataclass(frozen=True, kw_only=True)
class Gain(Job):
    """gain of the target and control sweeps"""

    command = "gain"
    target: str = given("the target head's sweep table")
    control: str = given("the control head's sweep table")
    out: str = given("the gain table")
    resamples: int = setting("intervention.bootstrap")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class InductionScores(ModelJob):
    """induction prompts and per-prompt head scores"""

    command = "induction-scores"
    model_info: str = given("the model's geometry (model-info)")
    out: str = given("scores.parquet")
    prompts_out: str = given("prompts.parquet")
    families: list[str] = setting("induction.families")
    lags: list[int] = setting("induction.lags")
    seq_len: int = setting("induction.seq_len")
    per_lag: int = setting("induction.per_lag")
    batch_size: int = setting("induction.batch_size")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class InductionAnalysis(Job):
    """layer profile, bootstrap, nulls"""

    command = "induction-analysis"
    scores: str = given("scores.parquet (induction-scores)")
    profile_out: str = given("profile.json")
    nulls_out: str = given("nulls.parquet")
    profile: str = setting("induction.profile")
    quantile: float = setting("induction.quantile")
    bootstrap: int = setting("induction.bootstrap")
    permutations: int = setting("induction.permutations")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class InductionCausal(ModelJob):
    """ablate top-k and random-k heads"""

    command = "induction-causal"
    prompts: str = given("prompts.parquet (induction-scores)")
    profile: str = given("profile.json (head scores)")
    out: str = given("causal.json")
    k: int = setting("induction.causal.k")
    mode: str = setting("induction.causal.mode")
    draws: int = setting("induction.causal.draws")
    n_prompts: int = setting("induction.causal.prompts")
    bootstrap: int = setting("induction.bootstrap")
    batch_size: int = setting("induction.batch_size")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class ParetoScore(DeviceJob):
    """perplexity and latency of one policy and sparsity"""

    command = "pareto-score"
    manifest: str = given("the corpus stage's manifest.json")
    out: str = given("the run's table")
    policy: str = given("a policy or a configured variant (attnlab policies)")
    sparsity: float = given("the target sparsity")
    regime: str = given("prefill or cache")
    policy_params: dict = setting("policy_params.{policy}")
    tolerance: float = setting("niah.sparsity_tolerance")
    context: float = setting("pareto.context")
    chunks: int = setting("pareto.chunks")
    repeats: int = setting("pareto.repeats")


@dataclass(frozen=True, kw_only=True)
class ParetoTable(Job):
    """perplexity with intervals and latency per run"""

    command = "pareto-table"
    inputs: list[str] = given("pareto-score tables")
    out: str = given("the table")
    resamples: int = setting("pareto.bootstrap")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class AblationTable(Job):
    """NIAH accuracy and perplexity per policy variant"""

    command = "ablation-table"
    niah: list[str] = given("niah-score tables")
    pareto: list[str] = given("pareto-score tables")
    out: str = given("the table")
    resamples: int = setting("pareto.bootstrap")
    seed: int = setting("seed")


@dataclass(frozen=True, kw_only=True)
class Curvature(ModelJob):
    """coarse curvature and weight of a NIAH prompt"""

    command = "curvature"
    prompts: str = given("NIAH prompts.parquet")
    out: str = given("the block pairs' table")
    length: int = setting("curvature.length")
    depth: float = setting("curvature.depth")
    layer: int = setting("curvature.layer")
    block_size: int = setting("policy_params.cab.block_size")
    adjacency: str = setting("policy_params.cab.adjacency")
    graph: str = setting("policy_params.cab.graph")
    device: str = setting("device")
    dtype: str = setting("dtype")


def shard_of(text: str, name: str = "--shard") -> tuple[int, int]:
    """``<i>of<n>`` (a NiahScore's ``shard``) as (i, n), 1 <= i <= n; else one line naming
    ``name``."""
    try:
        part, parts = (int(x) for x in text.split("of"))
    except ValueError:
        raise UserError(f"{name} must be <i>of<n> (e.g. 2of4), got {text!r}") from None
    if not 1 <= part <= parts:
        raise UserError(f"{name} {text}: shard i of n needs 1 <= i <= n")
    return part, parts
