# Everything that is not a rule: config validation, names, input functions.
import json
import re
import sys
from pathlib import Path

from attnlab.cli import FIGURES
from attnlab.workflow import validate as config_validate
from attnlab.errors import UserError
from attnlab.jobs import job_json as jobs_job_json
from attnlab.sources import module_sources
from attnlab.workflow import model_key, pct, sparsity
from attnlab.workflow import ablation_policies as workflow_ablation_policies
from attnlab.workflow import generate_policies as workflow_generate_policies
from attnlab.workflow import default_targets as workflow_default_targets
from attnlab.workflow import cache_shards as workflow_cache_shards
from attnlab.workflow import gpu_job_kind as workflow_gpu_job_kind
from attnlab.workflow import haystacks as workflow_haystacks
from attnlab.workflow import gpu_mem_gb as workflow_gpu_mem_gb
from attnlab.workflow import latency_params as workflow_latency_params
from attnlab.workflow import latency_policies as workflow_latency_policies
from attnlab.workflow import NIAH_PART
from attnlab.workflow import niah_part as workflow_niah_part
from attnlab.workflow import policy_module as workflow_policy_module
from attnlab.workflow import policy_errors as workflow_policy_errors
from attnlab.workflow import policy_spec as workflow_policy_spec
from attnlab.workflow import policy_params as workflow_policy_params


def job(command, **given):
    """A rule's ``--job`` (:mod:`attnlab.jobs`): its record's settings from the config and
    ``given``, values or functions of the wildcards. A function of the wildcards alone,
    so that Snakemake reruns a job whose settings changed (params trigger)."""

    def record(wildcards):
        values = {k: v(wildcards) if callable(v) else v for k, v in given.items()}
        return jobs_job_json(command, JOB_CONFIG, **values)

    return record


def validate_config(cfg):
    """Validate against the schema (filling defaults); a bad value stops with one line."""
    try:
        config_validate(
            cfg, schema=Path(workflow.basedir) / "schemas/config.schema.yaml"
        )
    except UserError as e:
        sys.exit(f"attnlab: {e}")


validate_config(config)
if policy_errors := workflow_policy_errors(config):
    sys.exit(f"attnlab: config error: {policy_errors[0]}")

# the config the job records read: the used policies' parameters beside it
JOB_CONFIG = config | {"policy_params": workflow_policy_params(config)}
MODELS = {model_key(m): m for m in config["models"]}
NIAH = config["niah"]
HAYSTACKS = workflow_haystacks(NIAH["haystack"])
CORPUS = config["corpus"]
CAPTURE = config["capture"]
INTERVENTION = config["intervention"]
PARETO = config["pareto"]
ABLATION = config["ablation"]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) if MODELS else "[^/]+",
    policy="[a-z0-9_]+",
    pct=r"\d+(\.\d+)?",


def corpus_local_source(wildcards):
    """The corpus files when the source is local, so that editing them re-shards."""
    return [CORPUS["source"]] if Path(CORPUS["source"]).exists() else []


def model_name(wildcards):
    return MODELS[wildcards.model]


def cache_files(grid, model):
    """A grid's cache-regime table, or its shards' (niah.cache_shards)."""
    shards = workflow_cache_shards(NIAH["cache_shards"])
    return [f"results/{grid}/cache/{model}/all{s}.parquet" for s in shards]


def niah_all(wildcards):
    """Whether a NIAH job's part is ``all`` (every run) or ``all_<i>of<n>`` (a shard)."""
    return niah_run(wildcards) is None


def niah_run(wildcards):
    """The (policy, sparsity) of a one-run NIAH part ``<policy>_<pct>``; None for ``all``."""
    return workflow_niah_part(wildcards.part)[0]


def niah_runs(wildcards):
    """A NIAH job's runs, ``[policy, params, sparsity]``: one, or for the part ``all``
    every run of the grid, full attention first."""
    if (run := niah_run(wildcards)) is not None:
        return [[run[0], policy_spec(run[0]), run[1]]]
    policies, sparsities = niah_grid(wildcards)
    return [["full", {}, 0.0]] + [
        [p, policy_spec(p), s] for p in policies for s in sparsities
    ]


def niah_shard(wildcards):
    """A NIAH job's shard of the prompts, ``<i>of<n>``, from its part (``all_<i>of<n>``)."""
    return workflow_niah_part(wildcards.part)[1]


def niah_score_files(wildcards=None):
    """Every model's cache-regime table (it holds full attention's rows of both regimes:
    one dense prefill, dense decoding) and prefill-regime tables."""
    prefill = NIAH["regimes"]["prefill"]
    return [f for m in MODELS for f in cache_files("niah", m)] + [
        f
        for m in MODELS
        for f in run_files("niah/prefill", m, prefill, NIAH["sparsities"], full=False)
    ]


# The NIAH tables figures render from: the pipeline's, and the committed GPU study's.
NIAH_TABLES = {
    "niah": "results/niah/niah.parquet",
    "long_context": "results_ref/long_context/niah.parquet",
    "oracle_gap": "results_ref/oracle_gap/niah.parquet",
}


def niah_table(wildcards):
    return NIAH_TABLES[wildcards.study]


def prefill_latency_table(wildcards):
    """The prefill latency table beside a study's NIAH table: the pipeline's benchmark of
    its first model, or the committed GPU study's."""
    if wildcards.study == "long_context":
        return "results_ref/long_context/prefill_latency.parquet"
    return f"results/bench/{next(iter(MODELS))}/prefill.parquet"


def latency_policies():
    """The prefill benchmark's policies: full attention, the prefill-regime block policies
    of the NIAH grid (the ones FlexAttention runs), then its token-level ones."""
    return workflow_latency_policies(NIAH["regimes"]["prefill"], config["policies"])


def latency_params():
    """Their parameters as the NIAH jobs run them (:func:`attnlab.workflow.latency_params`)."""
    return workflow_latency_params(latency_policies(), config["policies"])


def generate_policies():
    """The per-token decode benchmark's policies (:func:`attnlab.workflow.generate_policies`)."""
    return workflow_generate_policies(NIAH["regimes"]["cache"])


def niah_study_targets():
    """The NIAH study of this config: its table, the prefill latency and per-token decode
    tables of each model, the heatmap at each sparsity, and the length, latency and
    recall figures."""
    figs = [f"figs/niah_heatmap_{pct(s)}.png" for s in NIAH["sparsities"]]
    figs += [f"figs/niah_{k}.png" for k in ("length", "latency", "recall")]
    bench = [
        f"results/bench/{m}/{b}.parquet"
        for m in MODELS
        for b in ("prefill", "generate")
    ]
    return ["results/niah/niah.parquet", *bench, *figs]


def gpu_mem_gb(wildcards):
    """A GPU job's memory claim (GiB), from its kind and the longest NIAH prompt: see
    :func:`attnlab.workflow.gpu_mem_gb`. The GPU profile caps the claims' sum."""
    return workflow_gpu_mem_gb(gpu_job_kind(wildcards), max(NIAH["lengths"]))


def gpu_job_kind(wildcards):
    if hasattr(wildcards, "part"):  # a NIAH job: one run, or the dense prefill of all
        policy = (niah_run(wildcards) or (None,))[0]
    else:
        policy = getattr(wildcards, "policy", None)
    return workflow_gpu_job_kind(policy, config["policies"])


def niah_grid(wildcards):
    """The policies and sparsities of a NIAH job's grid in its regime: the NIAH grid's,
    or the ablation's."""
    if wildcards.grid == "ablation":
        return ablation_policies(), ABLATION["sparsities"]
    return NIAH["regimes"][wildcards.regime], NIAH["sparsities"]


def niah_sources(wildcards):
    """Package modules a NIAH job runs: its run's policy module, or every policy's of the
    grid, so that editing one reruns just the jobs that use it."""
    run = niah_run(wildcards)
    names = ["full", *niah_grid(wildcards)[0]] if run is None else [run[0]]
    return policy_sources(names, "niah_jobs")


def pareto_sources(wildcards):
    return policy_sources([wildcards.policy], "pareto")


def policy_sources(policies, stage):
    """The command line, the stage module ``stage`` whose verb the job runs, and its
    policies' modules (the verbs import the policy registry by name, not every policy).
    """
    mods = [
        f"policies.{workflow_policy_module(p, config['policies'])}" for p in policies
    ]
    return module_sources(
        "cli", stage, "attention", "models", *dict.fromkeys(mods), root=workflow.basedir
    )


def figure_code(figure):
    """The code a figure's job runs: the command line and the plot module that draws it
    (:data:`attnlab.cli.FIGURES`), with what they import."""
    return module_sources("cli", f"plots.{FIGURES[figure]}", root=workflow.basedir)


def policy_spec(name):
    return workflow_policy_spec(name, config["policies"])


def ablation_policies():
    return workflow_ablation_policies(
        ABLATION["baselines"],
        ABLATION["lams"],
        policy_spec("cab"),
        ABLATION["variants"],
    )


def run_files(folder, model, policies, sparsities, full=True):
    """Per-run tables under results/<folder>: full attention once (``full``), then each
    policy at each sparsity."""
    runs = [("full", "0")] * full + [(p, pct(s)) for p in policies for s in sparsities]
    return [f"results/{folder}/{model}/{p}_{q}.parquet" for p, q in runs]


def pareto_files(wildcards):
    """Every regime's perplexity tables, full attention in each (it scores other tokens
    in each regime)."""
    return [
        f
        for regime in PARETO["regimes"]
        for f in run_files(
            f"pareto/{regime}",
            wildcards.model,
            PARETO["policies"],
            PARETO["sparsities"],
        )
    ]


def ablation_inputs(wildcards):
    """NIAH and perplexity tables of CAB's variants in every ablation regime: the cache
    regime's NIAH rows from one shared-prefill job (with full attention's rows of both
    regimes), the prefill regime's from per-run jobs."""
    m, policies, sparsities = (
        wildcards.model,
        ablation_policies(),
        ABLATION["sparsities"],
    )
    regimes = ABLATION["regimes"]
    niah = cache_files("ablation", m) if "cache" in regimes else []
    if "prefill" in regimes:
        full = "cache" not in regimes
        niah += run_files("niah/prefill", m, policies, sparsities, full=full)
    pareto = [
        f
        for regime in regimes
        for f in run_files(f"pareto/{regime}", m, policies, sparsities)
    ]
    return {"niah": niah, "pareto": pareto}


def niah_haystack_input(wildcards):
    """The corpus, when the haystack is drawn from it."""
    if "corpus" in HAYSTACKS:
        return {"corpus": f"results/corpus/{wildcards.model}/manifest.json"}
    return {}


def niah_haystack_arg(wildcards, input):
    return f"--corpus {input.corpus}" if "corpus" in input.keys() else ""


def target_sparsity(wildcards):
    return sparsity(wildcards.pct)


def all_targets():
    return workflow_default_targets(list(MODELS), NIAH["sparsities"])


def intervention_heads_input(wildcards):
    """The capture tables, when a head is to be picked from them (auto)."""
    if "auto" in (INTERVENTION["target"], INTERVENTION["control"]):
        return {"metrics": f"results/capture/{wildcards.model}/metrics"}
    return {}


def capture_metrics_arg(wildcards, input):
    return f"--capture-metrics {input.metrics}" if "metrics" in input.keys() else ""


def sweep_files(wildcards):
    """The target's and the control's sweep tables, once the heads are resolved."""
    heads = checkpoints.intervention_heads.get(model=wildcards.model).output[0]
    chosen = json.loads(Path(heads).read_text())
    base = f"results/intervention/{wildcards.model}"
    return {r: f"{base}/{chosen[r]['head']}.parquet" for r in ("target", "control")}


def sweep_args(wildcards, input, flag=None):
    """The sweep tables as command-line arguments. A dry run plans these jobs before the
    heads are known (the checkpoint has not run), when the inputs are still unnamed."""
    if "target" not in input.keys():
        return "<target and control sweeps, once the heads are resolved>"
    if flag is None:
        return f"--target {input.target} --control {input.control}"
    return f"{flag} {input.target} {input.control}"


def induction_tables(kind):
    """Every model's table behind a cross-model induction figure."""
    name = "causal.json" if kind == "causal" else "profile.json"
    return [f"results/induction/{m}/{name}" for m in MODELS]
