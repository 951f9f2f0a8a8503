"""Command line: every pipeline stage as ``attnlab <stage> ...``, so rules stay thin.

This module only parses: each command calls one verb of its stage's module, named in
:data:`VERBS` and imported when called, so that the rules' code inputs
(:func:`attnlab.sources.module_sources` follows imports, not these names) hold this
module and the stage a rule runs, never every stage. A stage's verb takes one record
(:mod:`attnlab.jobs`): the rules pass its settings as ``--job`` JSON and its files as
flags; typed by hand without ``--job``, the settings not given as flags are read from the
effective config (the config schema holds the defaults). ``plot``, ``policies``,
``config`` and ``bench`` keep options of their own.

Bad input ends with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from importlib import import_module
from pathlib import Path

from attnlab.errors import UserError

# Command -> "module:function", the verb it calls with its options as keywords.
VERBS = {
    "policies": "attnlab.policies.fields:show",
    "config": "attnlab.workflow:show_config",
    "model-info": "attnlab.models:write_info",
    "niah-prompts": "attnlab.niah_jobs:write_prompts",
    "niah-score": "attnlab.niah_jobs:score",
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


def _record_parser(sub, command: str) -> None:
    """A command's options: ``--job`` (the rules' JSON) and a flag per field of its
    record (:mod:`attnlab.jobs`), typed from the field."""
    import typing

    from attnlab.jobs import RECORDS
    from attnlab.record import flag

    record = RECORDS[command]
    s = sub.add_parser(command, help=record.__doc__.strip().replace("%", "%%"))
    s.add_argument("--job", help="JSON: the record's fields, as the rules pass them")
    s.add_argument(
        "--configfile", nargs="+", help="without --job: config files on top of the workflow's"
    )
    hints = typing.get_type_hints(record)
    for f in fields(record):
        hint = hints[f.name]
        arms = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is list:
            arms = [hint]
        listed = next((a for a in arms if typing.get_origin(a) is list), None)
        base = typing.get_args(listed)[0] if listed else arms[0]
        kind = _json if base in (list, dict) else {int: int, float: float}.get(base, str)
        if f.metadata.get("setting"):
            help_ = f"from the config: {f.metadata['setting']}"
        else:
            help_ = f.metadata.get("help", "").replace("%", "%%")
        s.add_argument(flag(f.name), type=kind, nargs="+" if listed else None, help=help_)


def _json(text: str):
    return json.loads(text)


_json.__name__ = "JSON"  # argparse names a value it cannot read by its type's name


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
(snakemake --cores 8 figs/niah_heatmap_99.png runs them for you); by hand, in the
workflow folder, give a command its files (attnlab niah-score --help lists them) and any
setting to change: the others come from workflow_config.yaml. Start with: attnlab
policies (each policy and its parameters), attnlab config (the config a run uses),
attnlab bench --help (the benchmarks), attnlab plot --help (the figures). Bad input ends
with one line on stderr and exit status 1."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description=USAGE)
    sub = p.add_subparsers(dest="command", required=True)
    from attnlab.jobs import RECORDS

    for command in RECORDS:
        _record_parser(sub, command)
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
    s.add_argument(
        "--knobs-only",
        action="store_true",
        help="with --table: the keys workflow_config.yaml sets (README's table)",
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
    elif command in ("policies", "config"):
        _verb(command)(**options)
    else:
        _verb(command)(record(command, options.pop("job"), options))


def record(command: str, job: str | None, flags: dict):
    """The record of ``command`` from its ``--job`` JSON and flags (flags win); by hand,
    without ``--job``, the settings not given come from the effective config."""
    from attnlab.jobs import RECORDS

    cls = RECORDS[command]
    configfiles = flags.pop("configfile", None) or ()
    given = {k: v for k, v in flags.items() if v is not None}
    wanted = [f for f in fields(cls) if f.metadata.get("setting") and f.name not in given]
    if job is None and not wanted:  # nothing to read from a config
        values = {}
    elif job is not None:
        try:
            values = json.loads(job)
        except json.JSONDecodeError as e:
            raise UserError(f"{command}: --job is not JSON ({e})") from None
        if not isinstance(values, dict):
            raise UserError(f"{command}: --job is a JSON object of fields")
    else:
        # imported by name, as the verbs are: only a person's command reads the config
        # (the rules pass --job), so the Snakefile helper is no rule's code input
        workflow = import_module("attnlab.workflow")
        if not Path(workflow.BASE).is_file():
            raise UserError(
                f"{command}: without --job the settings come from {workflow.BASE} in the"
                " working directory, and there is none here"
            )
        keys = {f.name: f.metadata.get("setting") for f in fields(cls)}
        overrides = {keys[k]: v for k, v in given.items() if keys.get(k)}
        config = workflow.by_hand(configfiles, overrides, given.get("policy"))
        values = cls.settings(config, given)
    return cls.make({**values, **given})


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
