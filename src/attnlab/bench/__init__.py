"""Benchmarks, run as ``attnlab bench <name> ...``: one module each, timing shared.

``kernels`` times CAB's predictor and block-sparse attention against dense attention (torch
and triton only), ``capture`` the capture stage against ``output_attentions=True`` on the
real models, ``prefill`` a real model's prefill under each policy, ``decode`` one generated
token's attention over a long cache under each query-aware policy and an evicted cache,
``generate`` a real model's generated token under each cache-regime policy.
Only the benchmark named is imported, so ``bench kernels`` never loads the models, the
corpus or the capture stage.
"""

from __future__ import annotations

import argparse
from importlib import import_module

BENCHMARKS = {
    "kernels": "dense attention against CAB, latency by context length",
    "capture": "capture stage against output_attentions=True (real model)",
    "prefill": "real-model prefill latency per policy and sparsity",
    "decode": "one generated token's attention over a long cache, per policy and sparsity",
    "generate": "a real model's per-token decode latency over a long prompt, per policy",
}


def parser(name: str | None) -> argparse.ArgumentParser:
    """``attnlab bench``'s parser, with the options of benchmark ``name`` (its module
    imported) and the others by name only."""
    p = argparse.ArgumentParser(
        prog="attnlab bench",
        description="benchmarks; each one's options: attnlab bench NAME --help",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for bench, text in BENCHMARKS.items():
        sp = sub.add_parser(bench, help=text, description=text)
        if bench == name:
            import_module(f"{__name__}.{bench}").add_arguments(sp)
            for action in sp._actions:  # an option read from the config: its key, no default
                if (key := CONFIG_KEYS.get(bench, {}).get(action.dest)) is not None:
                    action.help = f"{key} (default: the config's, attnlab config)"
    return p


# Per benchmark, the options it shares with the pipeline -> the config key that holds
# their default: left unset, they read the effective config (workflow_config.yaml in the
# working directory), so that a default lives in the schema alone. The kernel and decode
# benchmarks time settings of their own (shapes, lengths).
_MODEL_JOB = {
    "sparsities": "niah.sparsities",
    "threads": "threads",
    "device": "device",
    "dtype": "dtype",
}
CONFIG_KEYS = {
    "prefill": {**_MODEL_JOB, "row_chunk": "niah.row_chunk"},
    "generate": _MODEL_JOB,
    "capture": {
        "models": "models",
        "threads": "threads",
        "chunk_len": "corpus.chunk_len",
        "mass": "capture.mass",
    },
}


def from_config(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with each unset option of its benchmark's :data:`CONFIG_KEYS` read from
    the effective config (imported by name: only a benchmark run by hand reads it, the
    rules pass these options)."""
    keys = CONFIG_KEYS.get(args.command, {})
    unset = [k for k in keys if getattr(args, k) is None]
    if unset:
        from pathlib import Path

        from attnlab.errors import UserError
        from attnlab.record import lookup

        workflow = import_module("attnlab.workflow")
        if not Path(workflow.BASE).is_file():  # as attnlab.cli.record guards a verb
            flags = ", ".join("--" + k.replace("_", "-") for k in unset)
            raise UserError(
                f"give {flags}, or run from the workflow folder (no {workflow.BASE} here)"
            )
        config = workflow.effective()  # a bad config stops with its own line
        for key in unset:
            setattr(args, key, lookup(config, keys[key]))
    return args


def main(argv: list[str]) -> None:
    """Parse ``argv`` (after ``bench``) and run the benchmark it names."""
    name = argv[0] if argv and argv[0] in BENCHMARKS else None
    args = from_config(parser(name).parse_args(argv))
    import_module(f"{__name__}.{args.command}").main(args)
