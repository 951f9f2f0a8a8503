"""Command line: every pipeline stage as ``attnlab <stage> ...``, so rules stay thin.

This module only parses: each command calls one verb of its stage's module, named in
:data:`VERBS` and imported when called, so that the rules' code inputs
(:func:`attnlab.sources.module_sources` follows imports, not these names) hold this
module and the stage a rule runs, never every stage. The options the rules pass are
required and have no default: the config schema holds the defaults.

Bad input ends with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from attnlab.errors import UserError

# attnlab.niah.TASKS
NIAH_TASKS = ["passkey", "multikey", "multivalue", "multiquery", "common_words"]

# Command -> "module:function", the verb it calls with its options as keywords.
VERBS = {
    "policies": "attnlab.policies.fields:show",
    "config": "attnlab.workflow:show_config",
    "model-info": "attnlab.models:write_info",
    "niah-prompts": "attnlab.niah_jobs:write_prompts",
    "niah-score": "attnlab.niah_jobs:score_prefill",
    "niah-cache": "attnlab.niah_jobs:score_cache_runs",
    "niah-table": "attnlab.niah_jobs:join_tables",
    "niah-paired": "attnlab.niah_paired:write_paired",
    "niah-matched": "attnlab.matched:write_matched",
    "corpus-shard": "attnlab.corpus:shard",
    "capture": "attnlab.capture:capture_corpus",
    "intervention-heads": "attnlab.intervention:choose_heads",
    "intervention": "attnlab.intervention:run_sweep",
    "gain": "attnlab.gain:write_gain",
    "induction-scores": "attnlab.induction:write_scores",
    "induction-analysis": "attnlab.robustness:analyse_scores",
    "induction-causal": "attnlab.causal:write_causal",
    "pareto-score": "attnlab.pareto:score_corpus",
    "pareto-table": "attnlab.pareto:write_table",
    "ablation-table": "attnlab.pareto:write_ablation",
    "curvature": "attnlab.curvature:write_block_pairs",
    "bench": "attnlab.bench:main",
}

# Figure -> the module under attnlab.plots whose ``render`` draws it.
FIGURES = {
    "niah-heatmap": "niah",
    "niah-summary": "niah",
    "niah-tasks": "niah",
    "niah-length": "niah",
    "niah-latency": "niah_latency",
    "niah-recall": "niah_recall",
    "capture-entropy": "capture",
    "capture-qnorm_entropy": "capture",
    "capture-keff": "capture",
    "capture-sink": "capture",
    "intervention": "intervention",
    "gain": "intervention",
    "induction-heatmap": "induction",
    "induction-profile": "induction",
    "induction-nulls": "induction",
    "induction-cross-model": "induction",
    "induction-causal": "induction",
    "induction-lag": "induction",
    "pareto": "pareto",
    "ablation": "pareto",
    "curvature": "curvature",
}


def _verb(command: str):
    """The function that ``command`` calls, its module imported now."""
    module, name = VERBS[command].split(":")
    return getattr(import_module(module), name)


def _required(s: argparse.ArgumentParser, *flags: str, **kw) -> None:
    """Options that every rule passes: required, without a default."""
    for flag in flags:
        s.add_argument(flag, required=True, **kw)


def _policy_args(s: argparse.ArgumentParser) -> None:
    """Arguments of a scoring job under one policy (see :mod:`attnlab.scoring`)."""
    _required(s, "--policy", "--policy-params")
    _required(s, "--sparsity", "--tolerance", type=float)
    _required(s, "--seed", "--threads", type=int)
    _device_args(s)


def _device_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", required=True, help="cpu, cuda, or auto (the GPU when there is one)")
    s.add_argument(
        "--dtype",
        required=True,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto: bfloat16 on a GPU, float32 on the CPU",
    )


def _niah_parsers(sub) -> None:
    s = sub.add_parser(
        "model-info", help="load a model once (builds the cache), write its geometry"
    )
    _required(s, "--model", "--out")

    s = sub.add_parser("niah-prompts", help="passkey prompts for one model's tokenizer")
    _required(s, "--model", "--model-info", "--out")
    _required(s, "--lengths", type=int, nargs="+")
    _required(s, "--depths", type=float, nargs="+")
    _required(s, "--samples", "--seed", type=int)
    _required(s, "--haystack", nargs="+", choices=["noise", "corpus"])
    # passed by the rule only for the corpus haystack
    s.add_argument("--corpus", help="the corpus manifest, for the corpus haystack")
    _required(s, "--tasks", nargs="+", choices=NIAH_TASKS)
    _required(s, "--needles", type=int, help="needles of the multi-needle tasks")
    _required(s, "--templates", help="JSON: phrasing (attnlab.niah.Templates)")

    s = sub.add_parser("niah-score", help="score prompts under one policy and sparsity")
    _required(s, "--model", "--prompts", "--out")
    _policy_args(s)
    _required(s, "--max-new-tokens", type=int)
    _required(s, "--row-chunk", type=int, help="prompt rows per call (0: all)")

    s = sub.add_parser(
        "niah-cache", help="score prompts under every cache-regime run, one prefill each"
    )
    _required(s, "--model", "--prompts", "--out")
    _required(s, "--runs", help="JSON: [[policy, params, sparsity], ...]")
    _required(s, "--shard", help="<i>of<n>: the i-th of n interleaved parts of the prompts")
    _required(s, "--tolerance", type=float)
    _required(s, "--max-new-tokens", "--seed", "--threads", type=int)
    _device_args(s)

    s = sub.add_parser("niah-table", help="concatenate NIAH score tables")
    _required(s, "--out")
    s.add_argument("inputs", nargs="+")

    s = sub.add_parser(
        "niah-paired", help="each policy's accuracy against full attention and the best other"
    )
    _required(s, "--table", help="a NIAH table (niah-table)")
    _required(s, "--resamples", "--seed", type=int)
    _required(s, "--out")

    s = sub.add_parser(
        "niah-matched", help="each policy's highest sparsity keeping 90%% of full's answers"
    )
    _required(s, "--table", help="a NIAH table (niah-table)")
    _required(s, "--decode", help="an attnlab bench decode table (csv or parquet)")
    s.add_argument("--prefill", default="", help="an attnlab bench prefill table")
    s.add_argument("--generate", default="", help="an attnlab bench generate table")
    _required(s, "--out", "--fig")


def _corpus_parsers(sub) -> None:
    s = sub.add_parser("corpus-shard", help="filter, tokenize and chunk a corpus into shards")
    _required(s, "--model", "--split", "--manifest")
    _required(s, "--source", help="local jsonl/parquet path or HF dataset id")
    _required(s, "--keep-sets", nargs="+")
    _required(s, "--chunk-len", "--max-chunks", "--shard-size", type=int)
    _required(s, "--shards", help="directory of the shards")

    s = sub.add_parser("capture", help="per-token attention metrics and Q/K of a corpus")
    _required(s, "--model")
    _required(s, "--manifest", help="the corpus stage's manifest.json")
    _required(s, "--metrics", help="directory: one Parquet file per shard")
    _required(s, "--qk", help="directory: one Arrow IPC file per shard")
    _required(s, "--chunks", type=int, help="capture at most this many chunks")
    _required(s, "--batch-size", "--qk-chunks", "--threads", type=int)
    _required(s, "--mass", type=float, help="attention mass that k_eff covers")
    _required(s, "--qk-layers", type=int, nargs="*")
    _device_args(s)


def _intervention_parsers(sub) -> None:
    s = sub.add_parser("intervention-heads", help="resolve the target and control heads")
    _required(s, "--model", "--out")
    _required(s, "--target", "--control", help="L<layer>H<head>, or auto")
    # passed by the rule only when a head is auto
    s.add_argument("--capture-metrics", help="capture tables, for auto")
    _required(s, "--resamples", "--seed", type=int)

    s = sub.add_parser("intervention", help="query-scaling sweep of one head")
    _required(s, "--model", "--out")
    _required(s, "--manifest", help="the corpus stage's manifest.json")
    _required(s, "--heads", help="heads.json from intervention-heads")
    _required(s, "--head", help="L<layer>H<head>")
    _required(s, "--scales", type=float, nargs="+")
    _required(s, "--chunks", "--batch-size", "--threads", type=int)
    _required(s, "--mass", type=float)

    s = sub.add_parser("gain", help="gain of the target and control sweeps")
    _required(s, "--target", "--control", "--out")
    _required(s, "--resamples", "--seed", type=int)


def _induction_parsers(sub) -> None:
    s = sub.add_parser("induction-scores", help="induction prompts and per-prompt head scores")
    _required(s, "--model")
    _required(s, "--model-info", help="the model's geometry (model-info)")
    _required(s, "--families", nargs="+")
    _required(s, "--lags", type=int, nargs="+")
    _required(s, "--seq-len", "--seed", "--batch-size", "--threads", type=int)
    _required(s, "--per-lag", type=int, help="prompts per lag (and family)")
    _required(s, "--out", help="scores.parquet")
    _required(s, "--prompts-out", help="prompts.parquet")

    s = sub.add_parser("induction-analysis", help="layer profile, bootstrap, nulls")
    _required(s, "--scores", "--profile-out", "--nulls-out")
    _required(s, "--profile", choices=["mean", "top"])
    _required(s, "--quantile", type=float)
    _required(s, "--bootstrap", "--permutations", "--seed", type=int)

    s = sub.add_parser("induction-causal", help="ablate top-k and random-k heads")
    _required(s, "--model", "--prompts", "--out")
    _required(s, "--profile", help="profile.json (head scores)")
    _required(s, "--mode", choices=["zero", "mean"])
    _required(s, "--k", "--draws", "--n-prompts", "--bootstrap", type=int)
    _required(s, "--seed", "--batch-size", "--threads", type=int)


def _pareto_parsers(sub) -> None:
    s = sub.add_parser("pareto-score", help="perplexity and latency of one policy and sparsity")
    _required(s, "--model", "--out")
    _required(s, "--manifest", help="the corpus stage's manifest.json")
    _policy_args(s)
    _required(s, "--chunks", type=int, help="held-out chunks: the corpus's last")
    _required(s, "--repeats", type=int, help="timed passes per chunk")
    _required(s, "--regime", choices=["prefill", "cache"])
    _required(
        s,
        "--context",
        type=float,
        help="cache regime: share of each chunk densely prefilled; perplexity of the rest",
    )

    s = sub.add_parser("pareto-table", help="perplexity with intervals and latency per run")
    _required(s, "--resamples", "--seed", type=int)
    _required(s, "--out")
    s.add_argument("inputs", nargs="+", help="pareto-score tables")

    s = sub.add_parser("ablation-table", help="NIAH accuracy and perplexity per policy variant")
    _required(s, "--niah", nargs="+", help="niah-score tables")
    _required(s, "--pareto", nargs="+", help="pareto-score tables")
    _required(s, "--resamples", "--seed", type=int)
    _required(s, "--out")

    s = sub.add_parser("curvature", help="coarse curvature and weight of a NIAH prompt")
    _required(s, "--model", "--out")
    _required(s, "--prompts", help="NIAH prompts.parquet")
    _required(s, "--length", "--layer", "--block-size", "--threads", type=int)
    _required(s, "--depth", type=float)
    _required(s, "--adjacency", choices=["softmax", "scores", "dot"])
    _required(s, "--graph", choices=["symmetric", "directed", "rowsum"])
    _device_args(s)


def _plot_parser(sub) -> None:
    s = sub.add_parser("plot", help="render a figure from a table")
    s.add_argument("figure", choices=list(FIGURES))
    _required(
        s,
        "--table",
        nargs="+",
        help="a table, or the capture metrics folder; intervention: target and control sweeps",
    )
    _required(s, "--out")
    # Each figure takes some of these, and its rule passes those (plots.needs checks).
    s.add_argument("--sparsity", type=float, help="niah-heatmap: the target sparsity")
    s.add_argument("--resamples", type=int, help="bootstrap resamples")
    s.add_argument("--seed", type=int)


USAGE = """Every stage of the attnlab pipeline as a command. The Snakemake rules call these
with every option filled in from the config (snakemake --cores 8 figs/niah_heatmap_99.png
runs them for you); by hand, start with: attnlab policies (each policy and its
parameters), attnlab config (the config a run uses), attnlab bench --help (the
benchmarks), attnlab plot --help (the figures). Bad input ends with one line on stderr
and exit status 1."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description=USAGE)
    sub = p.add_subparsers(dest="command", required=True)
    _niah_parsers(sub)
    _corpus_parsers(sub)
    _intervention_parsers(sub)
    _induction_parsers(sub)
    _pareto_parsers(sub)
    _plot_parser(sub)
    sub.add_parser("policies", help="every policy: its label, level and parameters")
    s = sub.add_parser(
        "config", help="the config a run uses: workflow_config.yaml, overrides, defaults"
    )
    s.add_argument(
        "--configfile", nargs="+", help="config files on top, as snakemake's --configfile"
    )
    s.add_argument(
        "--table", action="store_true", help="every key, its meaning and default (Markdown)"
    )
    sub.add_parser("bench", add_help=False, help="benchmarks: attnlab bench kernels --help")
    return p


def run(argv: list[str]) -> None:
    """Parse ``argv`` and call the verb of the command it names."""
    if argv[:1] == ["bench"]:  # the benchmarks parse their own arguments
        _verb("bench")(argv[1:])
        return
    options = vars(parser().parse_args(argv))
    command = options.pop("command")
    if command == "plot":
        figure = options["figure"]
        import_module(f"attnlab.plots.{FIGURES[figure]}").render(**options)
    else:
        _verb(command)(**options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except UserError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
