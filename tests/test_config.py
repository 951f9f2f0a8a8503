"""``attnlab config``: the effective config a run uses, the schema's defaults filled in."""

from pathlib import Path

import yaml

from attnlab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(capsys, monkeypatch, *configfiles):
    monkeypatch.chdir(ROOT)
    args = ["config", "--configfile", *configfiles] if configfiles else ["config"]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_config_merges_overrides_over_the_workflow_config_and_fills_defaults(
    capsys, monkeypatch, tmp_path
):
    override = tmp_path / "over.yaml"
    override.write_text("niah:\n  lengths: [256]\npolicies:\n  h2o: {recent_ratio: 0.25}\n")
    code, out, _ = _config(capsys, monkeypatch, "configs/long_context.yaml", str(override))
    assert code == 0
    cfg = yaml.safe_load(out)
    base = yaml.safe_load((ROOT / "workflow_config.yaml").read_text())
    assert cfg["models"] == ["gemma3-270m"]  # the first override
    assert cfg["niah"]["lengths"] == [256]  # the second, over the first
    assert cfg["niah"]["depths"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # the first, merged key by key
    assert cfg["niah"]["haystack"] == base["niah"]["haystack"]  # the base's
    assert "split" not in base["corpus"] and cfg["corpus"]["split"] == "train"  # the schema's
    params = cfg["policy_params"]
    assert params["h2o"]["recent_ratio"] == 0.25
    assert params["cab_b64"]["base"] == "cab" and params["cab_b64"]["block_size"] == 64
    assert set(cfg["niah"]["regimes"]["prefill"]) <= set(params)


def test_config_refuses_a_bad_value_in_one_line(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("niah:\n  sparsities: [1.5]\n")
    code, out, err = _config(capsys, monkeypatch, str(bad))
    assert code == 1 and out == ""
    assert err.startswith("attnlab: error: config error at niah.sparsities.0")
    assert len(err.strip().splitlines()) == 1
    code, out, err = _config(capsys, monkeypatch, str(tmp_path / "missing.yaml"))
    assert code == 1 and "no such config file" in err


def test_the_schema_is_the_one_source_of_defaults(tmp_path, monkeypatch):
    """workflow_config.yaml lists the knobs a user is expected to change at the schema's
    (and the policies' dataclasses') defaults: a default changed in one place and not the
    other fails here, so the file never silently overrides the schema."""
    from attnlab.workflow import effective

    monkeypatch.chdir(ROOT)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    shipped, defaults = effective(), effective(base=empty)
    assert {k: v for k, v in shipped.items() if k != "policies"} == {
        k: v for k, v in defaults.items() if k != "policies"
    }  # policy_params included: every policy the grids run, every parameter


def test_readmes_configuration_table_is_the_schemas_for_the_shipped_knobs():
    """README's table is ``attnlab config --table --knobs-only``: a row per key that
    workflow_config.yaml sets, its description and default from the schema; a knob added
    to the file or a description or default changed in the schema fails here."""
    from attnlab.workflow import config_table, knobs

    keys = knobs(ROOT / "workflow_config.yaml", ROOT / "schemas/config.schema.yaml")
    assert {"models", "niah.regimes", "niah.sparsities", "policies"} <= set(keys)
    table = config_table(ROOT / "schemas/config.schema.yaml", keys)
    assert table in (ROOT / "README.md").read_text()


def test_the_configuration_doc_lists_every_key_of_the_schema():
    """docs/configuration.md ends with ``attnlab config --table``: every key of the schema,
    its description and default; a key added, removed or changed there fails here."""
    from attnlab.workflow import config_table

    table = config_table(ROOT / "schemas/config.schema.yaml")
    doc = (ROOT / "docs/configuration.md").read_text()
    assert doc.endswith(table)
    assert "| `niah.sparsities` |" in table and "| `policies` |" in table


def test_help_and_policies_speak_to_users(capsys):
    """What a user reads names commands and docs/, not the code's internals or DESIGN (a
    file a user's clone does not have)."""
    import pytest

    with pytest.raises(SystemExit):
        main(["--help"])
    assert main(["policies"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "attnlab config" in out and "attnlab policies" in out
    for internal in (":func:", ":data:", "DESIGN", "VERBS"):
        assert internal not in out
