"""Pure-Python helpers for the Snakefile: file names, model keys, code dependencies, and
the effective config (``workflow_config.yaml`` with any ``--configfile`` on top, merged
key by key as Snakemake merges them, validated against ``schemas/config.schema.yaml``
with its defaults filled in: :func:`validate`, which the Snakefile calls, and
``attnlab config``, which prints it).

Nothing here imports torch, so Snakemake starts fast (policies' parameters are read from
their source, :mod:`attnlab.policies.fields`).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from attnlab.errors import UserError
from attnlab.jobs import shard_of
from attnlab.policies import fields


def pct(sparsity: float) -> str:
    """File-name form of a sparsity: 0.99 -> '99', 0.995 -> '99.5'."""
    return f"{round(sparsity * 100, 6):g}"


def sparsity(pct_str: str) -> float:
    return round(float(pct_str) / 100.0, 8)


def model_key(name: str) -> str:
    """A model name as one path component: 'org/model' -> 'org--model'; a GGUF file's
    path -> its file name without the suffix."""
    if name.endswith(".gguf"):
        return Path(name).stem
    return name.replace("/", "--")


def _variant(name: str, policies: dict) -> tuple[str | None, dict]:
    """A configured name's base policy (None: the name is a policy itself) and the
    settings configured for it, its base's under its own."""
    spec = dict(policies.get(name, {}))
    if "base" in spec:
        base = spec.pop("base")
        return base, {**policies.get(base, {}), **spec}
    lam = fields.lam_variant(name)
    if lam and (lam[0] in policies or lam[0] in fields.registry()):
        return lam[0], {**policies.get(lam[0], {}), "lam": lam[1]}
    return None, spec


def policy_spec(name: str, policies: dict) -> dict:
    """Hyper-parameters of a configured policy, every one of its dataclass's fields (the
    defaults filled in, :func:`attnlab.policies.fields.check`). A variant is a
    ``policies`` entry with a ``base`` (``cab_b64: {base: cab, block_size: 64}``): its
    base's parameters with its own on top. A name ``<policy>_lam<percent>`` is that
    policy at another lambda. Either way ``base`` names the policy that runs (see
    :func:`attnlab.policies.make`)."""
    base, spec = _variant(name, policies)
    filled = fields.check(base or name, spec)
    return {**filled, "base": base} if base else filled


def policy_errors(config: dict) -> list[str]:
    """One line per problem with the config's policies: an entry that is neither a policy
    nor a variant of one (``base``), a parameter its dataclass does not have or a value
    it does not allow, a name the grids use that nothing defines."""
    policies, errors = config["policies"], []
    for name, entry in policies.items():
        if "base" in policies.get(entry.get("base"), {}):
            errors.append(f"policies.{name}: its base {entry['base']} is a variant itself")
            continue
        try:
            policy_spec(name, policies)
        except UserError as e:
            errors.append(f"policies.{name}: {e}")
    ablation, regimes = config["ablation"], config["niah"]["regimes"]
    names = [*regimes["cache"], *regimes["prefill"], *config["pareto"]["policies"]]
    names += [*ablation["baselines"], *ablation["variants"]]
    for name in dict.fromkeys(names):
        if name in policies or name.startswith("kvpress:"):
            continue
        if _variant(name, policies)[0] is None and name not in fields.names():
            errors.append(
                f"policy {name!r} is neither a policy ({', '.join(fields.names())}) "
                "nor configured under policies"
            )
    return errors


def policy_level(name: str, policies: dict) -> str:
    """``token`` or ``block``: the level of the policy a configured name runs."""
    return fields.info(_variant(name, policies)[0] or name).level


def latency_policies(prefill: list[str], policies: dict) -> list[str]:
    """The prefill benchmark's policies: full attention, then the block policies among
    ``prefill`` (the NIAH grid's prefill regime), then its token-level ones (timed in the
    row chunks their NIAH jobs take, ``--row-chunk``), variants among them (the benchmark
    builds each from its parameters, ``--policy-params``)."""
    block = [p for p in prefill if policy_level(p, policies) == "block"]
    return ["full", *block, *(p for p in prefill if p not in block and p != "full")]


def latency_params(names: list[str], policies: dict) -> str:
    """``attnlab bench prefill --policy-params`` for the policies ``names``: each one's
    parameters as its NIAH jobs run it (:func:`policy_spec`), as JSON."""
    return json.dumps({n: policy_spec(n, policies) for n in names})


def generate_policies(cache: list[str]) -> list[str]:
    """The per-token decode benchmark's policies: the oracle, Quest and SnapKV where the
    NIAH grid's cache regime (``cache``) scores them; full attention is its reference."""
    return [p for p in ("topk", "quest", "snapkv") if p in cache] or ["topk"]


# Peak GPU memory (GiB, torch's reserved pool) of one NIAH job at 32768 tokens: Gemma-3-270M
# in bfloat16 on an H200 (configs/long_context.yaml; each job's log ends with its peak).
# Measured over 15 prompts a job at commit f3d03af: block policies (a row per query block,
# FlexAttention) 4.8-6.1, token policies in row chunks of 1024 8.7-13.6, and SnapKV 35.9
# (18.4 allocated: the allocator's cache over three prompt lengths holds the rest), its own
# claim; the whole prefill at 32k by `attnlab bench prefill` (model included) took up to
# 19.0 for a token policy (StreamingLLM), the token claim. The dense cache-regime job
# (every cache policy's state beside one dense prefill, whose full attention peaks at 1.9
# with the model; a shard of the oracle-gap study held 2.2 on its first 8k prompts, by
# nvidia-smi): 8 is an allowance, not a measured peak at 32k. What holds the memory grows
# with the square of the length where a (T, T) mask is built, linearly where rows go in
# chunks (token policies, SnapKV).
GPU_PEAK_GIB_32K = {"block": 6.1, "token": 19.0, "snapkv": 35.9, "dense": 8.0}
GPU_MEM_FLOOR_GIB = 4.0  # the model, its cache and CUDA's own context


def haystacks(value: str | list[str]) -> list[str]:
    """``niah.haystack`` as a list: one haystack or several."""
    return [value] if isinstance(value, str) else list(value)


def cache_shards(n: int) -> list[str]:
    """The file-name suffixes of a cache-regime job's ``n`` shards (``niah.cache_shards``):
    ``_<i>of<n>``, or none for one job (``all.parquet``)."""
    return [""] if n == 1 else [f"_{i}of{n}" for i in range(1, n + 1)]


NIAH_PART = r"all(_[0-9]+of[0-9]+)?|[a-z0-9_]+_[0-9]+(\.[0-9]+)?"
"""A NIAH job's part, its table's file name: ``all`` (every run of the grid over one
dense prefill: the cache regime), ``all_<i>of<n>`` (its shard i of n) or
``<policy>_<pct>`` (one run: the prefill regime)."""


def niah_part(part: str) -> tuple[tuple[str, float] | None, str]:
    """A NIAH part's run, (policy, sparsity) or None for every run of the grid, and its
    shard of the prompts, ``<i>of<n>`` (``1of1`` unless the part is one)."""
    if re.fullmatch(NIAH_PART, part) is None:
        raise UserError(f"a NIAH part is all, all_<i>of<n> or <policy>_<pct>, got {part!r}")
    if part == "all":
        return None, "1of1"
    if part.startswith("all_"):
        shard = part.removeprefix("all_")
        shard_of(shard, f"NIAH part {part}, shard")  # the job's own check of --shard
        return None, shard
    policy, p = part.rsplit("_", 1)
    return (policy, sparsity(p)), "1of1"


def gpu_job_kind(policy: str | None, policies: dict) -> str:
    """The memory kind of a GPU job: ``dense`` (no policy: the cache-regime job),
    ``snapkv`` (SnapKV and its variants), else the policy's level."""
    if policy is None:
        return "dense"
    base = _variant(policy, policies)[0] or policy
    return "snapkv" if base == "snapkv" else policy_level(policy, policies)


def gpu_mem_gb(kind: str, length: int) -> int:
    """A GPU job's memory claim in whole GiB for prompts of up to ``length`` tokens (the
    ``gpu_mem_gb`` resource that profiles/gpu caps): the peak measured at 32k for its kind
    (:func:`gpu_job_kind`), scaled by length (squared, or linearly for the row-chunked
    token policies), plus 10%. Other models need the profile's ``set-resources``."""
    ratio = length / 32768
    scale = ratio if kind in ("token", "snapkv") else ratio**2
    return int(-(-max(GPU_MEM_FLOOR_GIB, GPU_PEAK_GIB_32K[kind] * scale) * 1.1 // 1))


def policy_module(name: str, policies: dict) -> str:
    """The module under ``attnlab.policies`` that a configured policy name runs."""
    return fields.info(_variant(name, policies)[0] or name).module


def ablation_policies(
    baselines: list[str], lams: list[float], cab: dict, variants: list[str] = ()
) -> list[str]:
    """The ablation's baselines, CAB at each lambda (the configured one is ``cab``), then
    CAB's named variants."""
    lam_runs = ["cab" if lam == cab["lam"] else f"cab_lam{pct(lam)}" for lam in lams]
    return [*baselines, *lam_runs, *(v for v in variants if v not in lam_runs)]


def default_targets(models: list[str], sparsities: list[float]) -> list[str]:
    """``rule all``: every stage's figures for every model (keys of the ``models``), the
    NIAH heatmap at each sparsity, and the committed GPU studies' figures. The benchmarks
    (figs/bench_kernels.png, figs/bench_capture.png, figs/bench_decode.png) are asked for
    by name."""
    capture = [f"capture_{{m}}_{k}" for k in ("entropy", "qnorm_entropy", "keff", "sink")]
    induction = [f"induction_{k}_{{m}}" for k in ("heatmap", "profile", "nulls")]
    stages = ["intervention_{m}", "gain_{m}", "pareto_{m}", "ablation_{m}", "curvature_{m}"]
    figs = [f"niah_heatmap_{pct(s)}" for s in sparsities]
    figs += ["niah_summary", "niah_tasks", "niah_recall"]
    figs += [f"induction_{k}" for k in ("cross_model", "causal", "lag")]
    figs += [f.format(m=m) for f in [*capture, *stages, *induction] for m in models]
    figs += ["long_context_length", "long_context_recall", "long_context_latency"]
    figs += ["long_context_matched", "oracle_gap_length", "oracle_gap_recall"]
    return [f"figs/{f}.png" for f in figs] + ["results/long_context/paired.parquet"]


BASE = "workflow_config.yaml"
SCHEMA = "schemas/config.schema.yaml"


def validate(config: dict, schema: str | Path) -> None:
    """Validate ``config`` in place against ``schema``, filling in its defaults; a bad
    value raises one line naming the key and what is wrong."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as snakemake_validate

    try:
        snakemake_validate(config, schema=str(schema))
    except WorkflowError as e:
        cause = e.__cause__ or e.__context__ or e
        where = ".".join(str(p) for p in getattr(cause, "absolute_path", [])) or "config"
        msg = getattr(cause, "message", str(e).splitlines()[-1])
        raise UserError(f"config error at {where}: {msg}") from None


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, nested mappings merged key by key (Snakemake's rule)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file holds a mapping of keys")
    return data


def policies_used(config: dict) -> list[str]:
    """Every policy name the grids run, in first-mention order: both NIAH regimes, the
    perplexity runs and the ablation's baselines and variants, with full attention and
    CAB (the curvature stage's settings)."""
    niah, ablation = config["niah"], config["ablation"]
    names = ["full", *niah["regimes"]["cache"], *niah["regimes"]["prefill"], "cab"]
    names += config["pareto"]["policies"]
    cab = policy_spec("cab", config["policies"])
    names += ablation_policies(ablation["baselines"], ablation["lams"], cab, ablation["variants"])
    return list(dict.fromkeys(names))


def effective(
    configfiles=(), base: str | Path = BASE, schema: str | Path = SCHEMA, top: dict | None = None
) -> dict:
    """The config a run with these ``--configfile`` options would use (paths relative to
    the workflow directory), ``top`` over them: defaults filled in, and
    ``policy_params``, each used policy's every parameter
    (:func:`attnlab.workflow.policy_spec`)."""
    config = _read(base)
    for path in configfiles:
        config = _merge(config, _read(path))
    config = _merge(config, top or {})
    validate(config, Path(schema).resolve())
    if errors := policy_errors(config):
        raise UserError(f"config error: {errors[0]}")
    return config | {"policy_params": policy_params(config)}


def by_hand(configfiles=(), overrides: dict | None = None, policy: str | None = None) -> dict:
    """The config a command typed by hand reads (:func:`attnlab.cli.record`): the
    effective config with the settings given as flags on top (``overrides``: dotted key
    -> value; a bad one stops with one line naming its key, as in a config file), and the
    parameters of ``policy`` (any policy, not only the grids')."""
    top: dict = {}
    for key, value in (overrides or {}).items():
        if key.startswith("policy_params."):  # a policy's field: its dataclass checks it
            continue
        *path, last = key.split(".")
        node = top
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    config = effective(configfiles, top=top)
    if policy is not None and policy not in config["policy_params"]:
        config["policy_params"][policy] = policy_spec(policy, config["policies"])
    return config


def policy_params(config: dict) -> dict:
    """Every used policy's parameters (:func:`policies_used`, :func:`policy_spec`): the
    effective config's ``policy_params``, which job records read (attnlab.jobs)."""
    return {n: policy_spec(n, config["policies"]) for n in policies_used(config)}


def _schema_keys(node: dict, path: str = ""):
    """(dotted key, schema node) of every documented key: sections are walked into, a key
    with its own description is one row (``niah.templates``, ``policies``)."""
    props = node.get("properties")
    if props and (not path or "description" not in node):
        for key, sub in props.items():
            yield from _schema_keys(sub, f"{path}.{key}" if path else key)
    else:
        yield path, node


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(value) if value else "{}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def knobs(base: str | Path = BASE, schema: str | Path = SCHEMA) -> list[str]:
    """The documented keys (:func:`_schema_keys`) that ``base`` sets: the knobs a user is
    expected to change, README's configuration table."""
    documented = {key for key, _ in _schema_keys(yaml.safe_load(Path(schema).read_text()))}

    def walk(node: dict, path: str = ""):
        for key, value in node.items():
            name = f"{path}.{key}" if path else key
            if name in documented:
                yield name
            elif isinstance(value, dict):
                yield from walk(value, name)

    return list(walk(_read(base)))


def config_table(schema: str | Path = SCHEMA, keys=None) -> str:
    """Every config key of ``schema`` (or those of ``keys``) as a Markdown table: key,
    meaning, default (a mapping's default by its keys). docs/configuration.md holds every
    key, README the knobs (:func:`knobs`); a test keeps both
    current."""
    root = yaml.safe_load(Path(schema).read_text())
    lines = ["| key | meaning | default |", "| --- | --- | --- |"]
    for key, node in _schema_keys(root):
        if keys is not None and key not in keys:
            continue
        if "description" not in node:
            raise UserError(f"{schema}: {key} has no description")
        meaning = node["description"].replace("|", "\\|")
        default = node.get("default", "")
        inner = {k: v["default"] for k, v in node.get("properties", {}).items() if "default" in v}
        if default == {} and inner:  # an object whose keys carry the defaults
            default = "; ".join(f"{k}: {_cell(v)}" for k, v in inner.items())
        default = _cell(default).replace("|", "\\|")
        lines.append(f"| `{key}` | {meaning} | {default} |")
    return "\n".join(lines) + "\n"


def show_config(
    configfile: list[str] | None = None, table: bool = False, knobs_only: bool = False
) -> None:
    """``attnlab config``: print the effective config as YAML, or (``table``) every key
    of the schema with its meaning and default as Markdown (``knobs_only``: the keys
    workflow_config.yaml sets, :func:`knobs`)."""
    if table:
        print(config_table(keys=knobs() if knobs_only else None), end="")
        return
    print(yaml.safe_dump(effective(configfile or ()), sort_keys=False), end="")
