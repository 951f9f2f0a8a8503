"""Job records (attnlab.jobs): every setting read from the config at a key the schema has,
the rules' JSON and a person's flags making the same record, bad values refused in one
line."""

import json
import os
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from attnlab.errors import UserError
from attnlab.jobs import RECORDS, NiahScore, ParetoScore, job_json
from attnlab.record import lookup
from attnlab.workflow import effective, policy_spec

ROOT = Path(__file__).parents[1]
ATTNLAB = str(Path(sys.executable).parent / "attnlab")
EXAMPLE = {str: "x", int: 3, float: 0.5, dict: {}, list: [], list[str]: ["a"]}


def _given(record) -> dict:
    """A value of its type for every field a job gives (the policy one that exists)."""
    hints = typing.get_type_hints(record)
    out = {}
    for f in fields(record):
        if f.metadata.get("setting"):
            continue
        out[f.name] = "cab" if f.name == "policy" else EXAMPLE.get(hints[f.name], "x")
    return out


@pytest.fixture(scope="module")
def config():
    return effective_at_root()


@pytest.mark.parametrize("command", list(RECORDS))
def test_every_setting_is_a_config_key_of_the_fields_type(command, config):
    """Made from the shipped config alone, every record's settings are the config's values
    at their keys, of the field's type (a wrong key or type fails here, not in a job)."""
    record = RECORDS[command]
    given = _given(record)
    job = record.make({**record.settings(config, given), **given})
    for f in fields(record):
        if key := f.metadata.get("setting"):
            assert getattr(job, f.name) == lookup(config, key.format(**given)), f.name


def test_a_rules_json_and_a_persons_flags_make_one_record(config):
    """The rule's ``--job`` (settings and wildcards) with its file flags, and the same job
    typed by hand (the settings from the config), are equal; a configured policy's
    parameters are its every field."""
    files = {"manifest": "m.json", "out": "o.parquet", "threads": 2}
    wildcards = {"model": "m", "policy": "cab", "sparsity": 0.5, "regime": "cache"}
    rule = json.loads(job_json("pareto-score", config, **wildcards))
    assert "threads" not in rule  # the scheduler's count, as a flag
    by_rule = ParetoScore.make({**rule, **files})
    given = {**wildcards, **files}
    by_hand = ParetoScore.make({**ParetoScore.settings(config, given), **given})
    assert by_rule == by_hand
    assert by_rule.policy_params == policy_spec("cab", config["policies"])
    assert by_rule.repeats == config["pareto"]["repeats"]


def test_bad_values_are_refused_in_one_line(config):
    given = {"model": "m", "prompts": "p", "out": "o", "regime": "cache", "shard": "1of1"}
    values = {**NiahScore.settings(config, given), **given, "runs": [["topk", {}, 0.99]]}
    assert NiahScore.make({**values, "tolerance": 0}).tolerance == 0.0  # an int is a float
    with pytest.raises(UserError, match=r"^niah-score: --tolerance must be float, got 'low'$"):
        NiahScore.make({**values, "tolerance": "low"})
    with pytest.raises(UserError, match=r"--row-chunk must be int, got True"):
        NiahScore.make({**values, "row_chunk": True})
    with pytest.raises(UserError, match=r"^niah-score: no such field --bogus$"):
        NiahScore.make({**values, "bogus": 1})
    with pytest.raises(UserError, match=r"^niah-score needs --prompts, --out$"):
        NiahScore.make({k: v for k, v in values.items() if k not in ("prompts", "out")})
    with pytest.raises(UserError, match="config has no key niah.nothing"):
        lookup(config, "niah.nothing")


def _attnlab(*args, cwd):
    return subprocess.run([ATTNLAB, *args], capture_output=True, text=True, cwd=cwd)


def test_by_hand_the_settings_come_from_the_working_directorys_config(tmp_path):
    """Typed by hand in the workflow directory, a command needs only what no config key
    gives; elsewhere, without --job, it says where the settings come from. One line each,
    nothing written."""
    out = tmp_path / "paired.parquet"
    proc = _attnlab("niah-paired", "--out", str(out), cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr == "attnlab: error: niah-paired needs --table\n"
    proc = _attnlab("niah-paired", "--table", "t.parquet", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "without --job the settings come from workflow_config.yaml" in proc.stderr
    proc = _attnlab("niah-paired", "--job", "[1]", "--out", str(out), cwd=tmp_path)
    assert proc.stderr == "attnlab: error: niah-paired: --job is a JSON object of fields\n"
    assert not out.exists()


def test_a_benchmark_by_hand_reads_the_options_it_shares_with_the_pipeline(tmp_path, monkeypatch):
    """``attnlab bench prefill`` without --sparsities, --threads, --device, --dtype takes
    them from the config (their one default); outside the workflow folder it names them."""
    from attnlab import bench

    args = bench.parser("prefill").parse_args(
        ["prefill", "--model", "m", "--prompts", "p", "--length", "8", "--policies", "full"]
    )
    monkeypatch.chdir(ROOT)
    filled = bench.from_config(args)
    config = effective()
    assert filled.sparsities == config["niah"]["sparsities"]
    assert (filled.threads, filled.device, filled.dtype) == (
        config["threads"],
        config["device"],
        config["dtype"],
    )
    proc = _attnlab(
        "bench",
        "prefill",
        "--model",
        "m",
        "--prompts",
        "p",
        "--length",
        "8",
        "--policies",
        "full",
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert (
        "give --sparsities, --threads, --device, --dtype, --row-chunk, or run from the workflow"
        in proc.stderr
    )


@pytest.mark.parametrize("name", ["prefill", "generate", "capture"])
def test_a_benchmark_option_read_from_the_config_names_its_key_and_has_no_default(name):
    from attnlab import bench

    actions = {
        a.dest: a for a in bench.parser(name)._subparsers._group_actions[0].choices[name]._actions
    }
    for option, key in bench.CONFIG_KEYS[name].items():
        assert actions[option].default is None
        assert actions[option].help.startswith(f"{key} (default: the config's")


def effective_at_root() -> dict:
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        return effective()
    finally:
        os.chdir(cwd)


def test_by_hand_given_settings_are_checked_and_any_policy_or_config_file_serves(
    tmp_path, monkeypatch
):
    """A setting given as a flag is held to the schema (one line naming its key, nothing
    written); a policy outside the grids gets its parameters; --configfile is read as
    snakemake reads it."""
    from attnlab.cli import record

    out = tmp_path / "prompts.parquet"
    args = ["--model", "smollm2-135m", "--model-info", "i.json", "--out", str(out)]
    proc = _attnlab("niah-prompts", *args, "--haystack", "sand", cwd=ROOT)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("attnlab: error: config error at niah.haystack")
    assert not out.exists()
    monkeypatch.chdir(ROOT)
    flags = {"model": "m", "manifest": "x", "out": "o", "regime": "cache"}
    job = record("pareto-score", None, {**flags, "policy": "loki", "sparsity": 0.5})
    files = {"model": "m", "prompts": "p", "out": "o", "regime": "prefill"}
    files["configfile"] = ["configs/oracle_gap.yaml"]
    gap = record("niah-score", None, {**files, "runs": [["topk", {}, 0.99]]})
    assert job.policy_params == policy_spec("loki", {})
    assert gap.row_chunk == 1024 and gap.shard == "1of1"  # the study's, and one part


def test_only_the_benchmarks_that_share_an_option_read_the_config():
    from attnlab import bench

    kernels = bench.from_config(bench.parser("kernels").parse_args(["kernels"]))
    assert kernels.sparsities is None  # the kernel benchmark's own setting decides
