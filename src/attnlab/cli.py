"""Command line: every pipeline stage as ``attnlab <stage> ...``, so rules stay thin.

Bad input ends with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from attnlab.errors import UserError

NIAH_TASKS = ["passkey", "multikey", "multivalue", "multiquery"]  # attnlab.niah.TASKS


def _model_info(a) -> None:
    from attnlab import models

    _, _, info = models.load(a.model)
    _write_json(asdict(info), a.out)


def _write_json(obj, out: str) -> None:
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _niah_prompts(a) -> None:
    from transformers import AutoTokenizer

    from attnlab import models, niah, tables

    info = json.loads(open(a.model_info).read())
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(a.model))
    haystack = None
    if a.haystack == "corpus":
        from attnlab import corpus

        if a.corpus is None:
            raise UserError("the corpus haystack needs --corpus (the corpus manifest)")
        haystack = corpus.read_corpus(a.corpus).reshape(-1)
    try:
        templates = niah.Templates(**json.loads(a.templates))
    except TypeError as e:
        raise UserError(f"niah.templates: {e}") from e
    prompts = niah.make_prompts(
        tokenizer,
        a.lengths,
        a.depths,
        a.samples,
        a.seed,
        info["max_positions"],
        haystack,
        a.tasks,
        a.needles,
        templates,
    )
    rows = [dict(p.__dict__, model=a.model, haystack=a.haystack) for p in prompts]
    meta = {
        "model": a.model,
        "seed": a.seed,
        "haystack": a.haystack,
        "tasks": a.tasks,
        "needles": a.needles,
        "templates": templates.__dict__,
    }
    tables.write(rows, a.out, meta=meta)


def _corpus_shard(a) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from attnlab import corpus, models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(a.model))
    records = corpus.read_records(a.source, a.split)
    local = Path(a.source).exists() or a.source == corpus.BUILTIN
    chunks, counts = corpus.chunk_documents(
        records, tokenizer, a.chunk_len, a.keep_sets, a.max_chunks, scan_all=local
    )
    pad = tokenizer.pad_token_id
    pad = None if pad in (tokenizer.eos_token_id, tokenizer.bos_token_id) else pad
    meta = {
        "model": a.model,
        "source": a.source,
        "split": a.split,
        "keep_sets": sorted(a.keep_sets),
        "max_chunks": a.max_chunks,
        **counts,
    }
    corpus.write_shards(
        chunks, a.shards, a.manifest, a.chunk_len, len(tokenizer), pad, a.shard_size, meta
    )


def _capture(a) -> None:
    import hashlib
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from attnlab import capture, models, sparse
    from attnlab.workflow import module_sources

    torch.set_num_threads(a.threads)
    manifest = json.loads(Path(a.manifest).read_text())
    chunks = min(a.chunks, manifest["chunks"])
    # The resume folder is keyed by every module the capture runs, as the rule's inputs are.
    code = b"".join(Path(f).read_bytes() for f in module_sources("capture"))
    meta = {
        "model": a.model,
        "manifest_sha256": hashlib.sha256(Path(a.manifest).read_bytes()).hexdigest(),
        "chunk_len": manifest["chunk_len"],
        "chunks": chunks,
        "mass": a.mass,
        "qk_layers": sorted(a.qk_layers),
        "qk_chunks": a.qk_chunks,
        "code_sha256": hashlib.sha256(code).hexdigest(),
    }
    model, _, info = models.load(a.model, device=a.device, dtype=a.dtype)
    sparse.install(model)
    with tqdm(
        total=chunks * manifest["chunk_len"],
        unit="tok",
        unit_scale=True,
        desc=f"capture {a.model}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        job = capture.CorpusCapture(
            model,
            info.n_kv_heads,
            Path(a.manifest),
            chunks,
            a.batch_size,
            a.mass,
            sorted(a.qk_layers),
            a.qk_chunks,
            meta,
            bar,
        )
        counts = job.run(a.metrics, a.qk)
    print(f"captured {counts}", file=sys.stderr)


def _policy_job(a):
    """What a scoring job under one policy shares: the policy, its target sparsity (0 for
    full attention) and the model with attnlab's attention, on ``a.device``."""
    import torch

    from attnlab import models, policies, sparse

    torch.set_num_threads(a.threads)
    policy = policies.make(a.policy, **json.loads(a.policy_params))
    sparsity = 0.0 if policy.name == "full" else a.sparsity
    model, tokenizer, _ = models.load(a.model, device=a.device, dtype=a.dtype)
    return policy, sparsity, sparse.install(model), tokenizer


def _run_rows(rows: list[dict], a, policy, sparsity: float) -> dict:
    """Mark each result row with its run and feasibility; returns the run's metadata."""
    for r in rows:
        r.update(
            model=a.model,
            policy=a.policy,
            target_sparsity=sparsity,
            feasible=r["achieved_sparsity"] >= sparsity - a.tolerance,
        )
    return {
        "policy": a.policy,
        "params": policy.params(),
        "target_sparsity": sparsity,
        "tolerance": a.tolerance,
    }


def _niah_score(a) -> None:
    from attnlab import niah, tables

    prompts = niah.read_prompts(a.prompts)
    pmeta = tables.meta(a.prompts)
    policy, sparsity, model, tokenizer = _policy_job(a)
    rows = niah.score_niah(
        model,
        tokenizer,
        prompts,
        policy,
        sparsity,
        a.max_new_tokens,
        a.seed,
        desc=f"{a.model} {a.policy} {sparsity:g} prefill",
        regime="prefill",
        row_chunk=a.row_chunk,
    )
    run = _run_rows(rows, a, policy, sparsity)
    params = json.dumps(policy.params(), sort_keys=True)
    for r in rows:
        r.update(policy_params=params, haystack=pmeta.get("haystack"))
    meta = {**pmeta, **run, "regime": "prefill", "decode": "dense", "row_chunk": a.row_chunk}
    tables.write(rows, a.out, meta=meta)


def _niah_cache(a) -> None:
    """Every (policy, sparsity) of the cache regime on one model, one dense prefill per
    prompt shared by all of them."""
    import torch

    from attnlab import models, niah, policies, sparse, tables

    torch.set_num_threads(a.threads)
    prompts = niah.read_prompts(a.prompts)
    pmeta = tables.meta(a.prompts)
    runs = []
    for name, params, target in json.loads(a.runs):
        policy = policies.make(name, **params)
        runs.append((name, policy, 0.0 if policy.name == "full" else target))
    model, tokenizer, _ = models.load(a.model, device=a.device, dtype=a.dtype)
    rows = niah.score_cache(
        sparse.install(model),
        tokenizer,
        prompts,
        runs,
        a.max_new_tokens,
        a.seed,
        desc=f"{a.model} cache ({len(runs)} runs)",
    )
    params = {name: json.dumps(p.params(), sort_keys=True) for name, p, _ in runs}
    for r in rows:
        r.update(
            model=a.model,
            feasible=r["achieved_sparsity"] >= r["target_sparsity"] - a.tolerance,
            policy_params=params[r["policy"]],
            haystack=pmeta.get("haystack"),
        )
    meta = {**pmeta, "regime": "cache", "runs": json.loads(a.runs), "tolerance": a.tolerance}
    tables.write(rows, a.out, meta=meta)


def _niah_table(a) -> None:
    from attnlab import tables

    df = tables.read_all(a.inputs)
    meta = tables.meta(a.inputs[0]) | {
        "inputs": a.inputs,
        "full_attention": "both regimes' rows from the cache job: one dense prefill and decoding",
    }
    tables.write(df.to_arrow(), a.out, meta=meta)


def _niah_paired(a) -> None:
    from attnlab import niah_paired, tables

    rows = niah_paired.paired_rows(tables.read(a.table, niah_paired.COLUMNS), a.resamples, a.seed)
    meta = {"table": a.table, "resamples": a.resamples, "seed": a.seed}
    tables.write(rows, a.out, meta=meta)


def _pareto_score(a) -> None:
    import hashlib
    from pathlib import Path

    from attnlab import corpus, pareto, tables

    chunks = corpus.read_corpus(a.manifest)
    if not 0 < a.chunks <= len(chunks):
        raise UserError(
            f"pareto.chunks is {a.chunks} but the corpus holds {len(chunks)} chunks; "
            "raise corpus.max_chunks or lower pareto.chunks"
        )
    first = len(chunks) - a.chunks  # held out: the last chunks, capture reads the first
    policy, sparsity, model, _ = _policy_job(a)
    rows = pareto.score_chunks(
        model,
        chunks[first:],
        policy,
        sparsity,
        a.repeats,
        a.seed,
        chunk_ids=range(first, len(chunks)),
        desc=f"{a.model} {a.policy} {sparsity:g} {a.regime}",
        regime=a.regime,
        context=a.context,
    )
    device = pareto.device_name(model.device)
    run = _run_rows(rows, a, policy, sparsity)
    for r in rows:
        r.update(device=device, regime=a.regime)
    meta = {
        "model": a.model,
        **run,
        "regime": a.regime,
        "context": a.context if a.regime == "cache" else None,
        "manifest_sha256": hashlib.sha256(Path(a.manifest).read_bytes()).hexdigest(),
        "repeats": a.repeats,
        "threads": a.threads,
        "device": device,
    }
    tables.write(rows, a.out, meta=meta)


def _pareto_table(a) -> None:
    from attnlab import pareto, tables

    rows = pareto.collect(a.inputs, a.resamples, a.seed)
    tables.write(rows, a.out, meta=tables.meta(a.inputs[0]) | {"inputs": a.inputs})


def _ablation_table(a) -> None:
    from attnlab import pareto, tables

    rows = pareto.ablation(a.niah, a.pareto, a.resamples, a.seed)
    tables.write(rows, a.out, meta={"niah": a.niah, "pareto": a.pareto, "resamples": a.resamples})


def _frc_magnitude(a) -> None:
    import pyarrow as pa
    import torch

    from attnlab import curvature, models, niah, tables

    torch.set_num_threads(a.threads)
    pick = [
        p
        for p in niah.read_prompts(a.prompts)
        if p.length == a.length and abs(p.depth - a.depth) < 1e-9
    ]
    if not pick:
        raise UserError(
            f"no NIAH prompt of length {a.length} and depth {a.depth} in {a.prompts}; "
            "pick one from niah.lengths and niah.depths"
        )
    prompt = pick[0]
    model, _, info = models.load(a.model, device=a.device, dtype=a.dtype)
    if not 0 <= a.layer < info.n_layers:
        raise UserError(f"frc.layer {a.layer} outside the model's layers 0..{info.n_layers - 1}")
    cols = curvature.block_pairs(
        model,
        prompt.input_ids,
        a.layer,
        a.block_size,
        a.adjacency,
        a.graph,
        prompt.needle_positions,
    )
    meta = {
        "model": a.model,
        "layer": a.layer,
        "length": a.length,
        "depth": a.depth,
        "block_size": a.block_size,
        "adjacency": a.adjacency,
        "graph": a.graph,
        "haystack": tables.meta(a.prompts).get("haystack"),
        "needle_positions": prompt.needle_positions,
    }
    tables.write(pa.table(cols), a.out, meta=meta)


def _intervention_heads(a) -> None:
    from attnlab import intervention

    chosen = {}
    auto = None
    for role, value in (("target", a.target), ("control", a.control)):
        if value == "auto":
            if a.capture_metrics is None:
                raise UserError(f"intervention.{role} is auto but no capture tables were given")
            if auto is None:
                auto = intervention.pick_heads(a.capture_metrics, a.resamples, a.seed)
            chosen[role] = auto[role] | {
                "how": "auto: |r(query norm, entropy)| "
                + ("largest" if role == "target" else "smallest")
            }
        else:
            chosen[role] = {"head": intervention.Head.parse(value).name, "how": "config"}
    if chosen["target"]["head"] == chosen["control"]["head"]:
        raise UserError(f"target and control are the same head {chosen['target']['head']}")
    _write_json({"model": a.model, **chosen}, a.out)


def _intervention(a) -> None:
    from pathlib import Path

    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from attnlab import corpus, intervention, models, sparse, tables

    torch.set_num_threads(a.threads)
    heads = json.loads(Path(a.heads).read_text())
    role = next((r for r in ("target", "control") if heads[r]["head"] == a.head), None)
    if role is None:
        raise UserError(f"{a.head} is neither the target nor the control in {a.heads}")
    head = intervention.Head.parse(a.head)
    tokens = corpus.read_corpus(a.manifest)[: a.chunks].astype("int64")
    model, _, _ = models.load(a.model)
    sparse.install(model)
    head.check(model)
    sanity = intervention.sanity_check(model, tokens[:1], head)
    isolation = intervention.isolation_check(model, tokens[:1], head, max(a.scales))
    print(
        f"check: scale 1.0 against no intervention, largest logit difference {sanity:g}",
        file=sys.stderr,
    )
    print(f"check: isolation {isolation}", file=sys.stderr)
    if sanity > 1e-6 or not isolation["ok"]:
        raise UserError(
            f"the intervention on {head.name} failed its checks: scale 1.0 "
            f"differs by {sanity:g}; isolation {isolation}"
        )
    for metric, way in intervention.EXPECTED.items():
        print(f"expected as the scale grows: {metric} {way}", file=sys.stderr)
    with tqdm(
        total=len(a.scales) * tokens.size,
        unit="tok",
        unit_scale=True,
        desc=f"sweep {a.model} {head.name}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        cols = intervention.sweep(model, tokens, head, a.scales, a.batch_size, a.mass, bar)
    n = len(cols["scale"])
    cols |= {
        "model": [a.model] * n,
        "role": [role] * n,
        "layer": [head.layer] * n,
        "head": [head.head] * n,
    }
    meta = {
        "model": a.model,
        "role": role,
        "head": head.name,
        "selection": heads[role],
        "scales": a.scales,
        "chunks": int(len(tokens)),
        "mass": a.mass,
        "expected": intervention.EXPECTED,
        "checks": {"scale_one_max_logit_diff": sanity, "isolation": isolation},
    }
    tables.write(pa.table(cols), a.out, meta=meta)


def _gain(a) -> None:
    from attnlab import gain, tables
    from attnlab.intervention import SWEEP_METRICS

    cols = ["scale", "sample", "token", "layer", "head", *SWEEP_METRICS]
    target, control = tables.read(a.target, cols), tables.read(a.control, cols)
    rows = gain.gain_rows(target, control, a.resamples, a.seed)
    meta = {
        "target": tables.meta(a.target),
        "control": tables.meta(a.control),
        "resamples": a.resamples,
        "seed": a.seed,
    }
    for r in rows:
        r["model"] = meta["target"].get("model")
        print(
            f"{r['metric']:<11} {r['role']:<8} gain {r['gain']:+.4f} "
            f"[{r['gain_lo']:+.4f}, {r['gain_hi']:+.4f}]  {r['verdict']}",
            file=sys.stderr,
        )
    tables.write(rows, a.out, meta=meta)


def _induction_scores(a) -> None:
    import numpy as np
    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from attnlab import induction, models, sparse, tables

    info = json.loads(open(a.model_info).read())
    if a.seq_len > info["max_positions"]:
        raise UserError(
            f"induction seq_len {a.seq_len} exceeds the model's {info['max_positions']}"
        )
    torch.set_num_threads(a.threads)
    model, tokenizer, _ = models.load(a.model)
    sparse.install(model)
    prompts = induction.make_prompts(tokenizer, a.families, a.lags, a.seq_len, a.per_lag, a.seed)
    with tqdm(
        total=len(prompts),
        unit="prompt",
        desc=f"induction {a.model}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        scored = list(induction.score_prompts(model, prompts, a.batch_size, bar))
    scores = np.stack([s for _, s, _ in scored])  # (prompts, layers, heads)
    previous = np.stack([s for _, _, s in scored])  # (prompts, layers, heads)
    n, cells = len(prompts), scores[0].size
    layer, head = np.indices(scores.shape[1:]).reshape(2, -1)
    per_prompt = {"family": "family", "lag": "lag", "prompt": "index", "shuffled": "shuffled"}
    rows = {k: np.repeat([getattr(p, f) for p in prompts], cells) for k, f in per_prompt.items()}
    rows |= {"layer": np.tile(layer, n), "head": np.tile(head, n)}
    rows["score"] = scores.ravel().astype(np.float64)
    rows["prev_score"] = previous.ravel().astype(np.float64)
    meta = {
        "model": a.model,
        "families": a.families,
        "lags": a.lags,
        "seq_len": a.seq_len,
        "per_lag": a.per_lag,
        "seed": a.seed,
        "n_layers": info["n_layers"],
        "n_heads": info["n_heads"],
    }
    tables.write(pa.table(rows), a.out, meta=meta)
    tables.write([p.to_row() for p in prompts], a.prompts_out, meta=meta)


def _score_array(df, shuffled: bool, n_layers: int, n_heads: int, column: str = "score"):
    """Per-prompt (prompts, layers, heads) scores of the observed or the shuffled prompts."""
    import numpy as np
    import polars as pl

    d = df.filter(pl.col("shuffled") == shuffled).sort(["family", "lag", "prompt", "layer", "head"])
    return d[column].to_numpy().reshape(-1, n_layers, n_heads).astype(np.float64)


def _induction_analysis(a) -> None:
    import polars as pl

    from attnlab import induction, robustness, tables

    cols = ["family", "lag", "prompt", "shuffled", "layer", "head", "score", "prev_score"]
    df = tables.read(a.scores, cols)
    meta = tables.meta(a.scores)
    n_layers, n_heads = meta["n_layers"], meta["n_heads"]
    observed = _score_array(df, False, n_layers, n_heads)
    args = (a.profile, a.quantile)
    profile = robustness.bootstrap_profile(observed, *args, a.bootstrap, a.seed)
    profile |= {
        "model": meta["model"],
        "n_layers": n_layers,
        "how": a.profile,
        "quantile": a.quantile,
        "relative_depth": [i / n_layers for i in range(n_layers)],
        "head_scores": observed.mean(0).tolist(),
        "prev_head_scores": _score_array(df, False, n_layers, n_heads, "prev_score")
        .mean(0)
        .tolist(),
        "lags": {},
    }
    random = df.filter((pl.col("family") == "random") & ~pl.col("shuffled"))
    if random.height:
        by_prompt = random.sort(["family", "lag", "prompt", "layer", "head"])
        profile["by_lag"] = induction.lag_confound(
            _score_array(random, False, n_layers, n_heads),
            _score_array(random, False, n_layers, n_heads, "prev_score"),
            by_prompt["lag"].to_numpy()[:: n_layers * n_heads],
        )
    short = pl.col("lag") <= induction.SHORT_LAG
    for name, cond in (("short", short), ("long", ~short)):
        part = df.filter(cond & (pl.col("family") == "random"))
        if part.height:
            scores = _score_array(part, False, n_layers, n_heads)
            profile["lags"][name] = robustness.bootstrap_profile(scores, *args, a.bootstrap, a.seed)
    nulls = {
        "model": meta["model"],
        "shuffled_antecedent": robustness.shuffled_null(
            _score_array(df, True, n_layers, n_heads), *args, a.bootstrap, a.seed
        ),
        "head_permutation": robustness.head_permutation_null(
            observed.mean(0), *args, a.permutations, a.seed
        ),
    }
    _write_json(profile, a.profile_out)
    _write_json(nulls, a.nulls_out)


def _induction_causal(a) -> None:
    import numpy as np
    import polars as pl
    import torch

    from attnlab import causal, induction, models, tables

    torch.set_num_threads(a.threads)
    profile = json.loads(open(a.profile).read())
    head_scores = np.asarray(profile["head_scores"])
    df = tables.read(a.prompts, induction.ROW_COLUMNS)
    df = df.filter((pl.col("family") == "random") & ~pl.col("shuffled"))
    df = df.sort(["prompt", "lag"]).head(a.n_prompts)  # every lag in turn
    prompts = [induction.InductionPrompt.from_row(r) for r in df.iter_rows(named=True)]
    model, _, _ = models.load(a.model)
    result = causal.causal_check(
        model, prompts, head_scores, a.k, a.mode, a.draws, a.seed, a.bootstrap, a.batch_size
    )
    result["model"] = a.model
    print(
        f"copy accuracy {result['baseline']:.3f}; top-{a.k} ablated {result['topk']:.3f}; "
        f"random-{a.k} ablated {result['random']:.3f}",
        file=sys.stderr,
    )
    _write_json(result, a.out)


def _plot(a) -> None:
    from attnlab.plots import capture as capture_plots
    from attnlab.plots import niah as niah_plots

    if a.figure.startswith("induction-"):
        from attnlab.plots import induction as induction_plots

        induction_plots.FIGURES[a.figure](a.table, a.out)
    elif a.figure == "intervention":
        from attnlab.plots.intervention import plot_sweep

        plot_sweep(a.table, a.out, seed=a.seed)
    elif a.figure == "gain":
        from attnlab.plots.intervention import plot_gain

        plot_gain(a.table[0], a.out)
    elif a.figure in capture_plots.FIGURES:
        capture_plots.FIGURES[a.figure](a.table[0], a.out, resamples=a.resamples, seed=a.seed)
    elif a.figure in ("pareto", "ablation", "frc-magnitude"):
        from attnlab.plots import pareto as pareto_plots

        pareto_plots.FIGURES[a.figure](a.table[0], a.out)
    elif a.figure == "niah-heatmap":
        niah_plots.plot_heatmap(a.table[0], a.sparsity, a.out)
    elif a.figure == "niah-tasks":
        niah_plots.plot_tasks(a.table[0], a.out, seed=a.seed)
    elif a.figure == "niah-length":
        niah_plots.plot_length(a.table[0], a.out, seed=a.seed)
    elif a.figure == "niah-recall":
        niah_plots.plot_recall(a.table[0], a.out)
    elif a.figure == "niah-latency":
        if len(a.table) != 2:
            raise UserError("niah-latency takes --table NIAH_TABLE PREFILL_BENCH_TABLE")
        niah_plots.plot_latency(*a.table, a.out)
    else:
        niah_plots.plot_summary(a.table[0], a.out, paired=(a.table[1:] or [None])[0])


def _policy_args(s: argparse.ArgumentParser) -> None:
    """Arguments of a scoring job under one policy (see :func:`_policy_job`)."""
    s.add_argument("--policy", required=True)
    s.add_argument("--policy-params", default="{}")
    s.add_argument("--sparsity", type=float, default=0.0)
    s.add_argument("--tolerance", type=float, default=0.005)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    _device_arg(s)


def _device_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--device", default="auto", help="cpu, cuda, or auto (the GPU when there is one)"
    )
    s.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto: bfloat16 on a GPU, float32 on the CPU",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "model-info", help="load a model once (builds the cache), write its geometry"
    )
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_model_info)

    s = sub.add_parser("niah-prompts", help="passkey prompts for one model's tokenizer")
    s.add_argument("--model", required=True)
    s.add_argument("--model-info", required=True)
    s.add_argument("--lengths", type=int, nargs="+", required=True)
    s.add_argument("--depths", type=float, nargs="+", required=True)
    s.add_argument("--samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--haystack", default="noise", choices=["noise", "corpus"])
    s.add_argument("--corpus", help="the corpus manifest, for --haystack corpus")
    s.add_argument("--tasks", nargs="+", default=["passkey"], choices=NIAH_TASKS)
    s.add_argument("--needles", type=int, default=4, help="needles of the multi-needle tasks")
    s.add_argument("--templates", default="{}", help="JSON: phrasing (attnlab.niah.Templates)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_niah_prompts)

    s = sub.add_parser("corpus-shard", help="filter, tokenize and chunk a corpus into shards")
    s.add_argument("--model", required=True)
    s.add_argument("--source", required=True, help="local jsonl/parquet path or HF dataset id")
    s.add_argument("--split", default="train")
    s.add_argument("--keep-sets", nargs="+", required=True)
    s.add_argument("--chunk-len", type=int, default=512)
    s.add_argument("--max-chunks", type=int)
    s.add_argument("--shard-size", type=int, default=64)
    s.add_argument("--shards", required=True, help="directory of the shards")
    s.add_argument("--manifest", required=True)
    s.set_defaults(func=_corpus_shard)

    s = sub.add_parser("capture", help="per-token attention metrics and Q/K of a corpus")
    s.add_argument("--model", required=True)
    s.add_argument("--manifest", required=True, help="the corpus stage's manifest.json")
    s.add_argument("--metrics", required=True, help="directory: one Parquet file per shard")
    s.add_argument("--qk", required=True, help="directory: one Arrow IPC file per shard")
    s.add_argument("--chunks", type=int, default=64, help="capture at most this many chunks")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--mass", type=float, default=0.9, help="attention mass that k_eff covers")
    s.add_argument("--qk-layers", type=int, nargs="*", default=[])
    s.add_argument("--qk-chunks", type=int, default=8, help="chunks whose Q/K are kept")
    s.add_argument("--threads", type=int, default=1)
    _device_arg(s)
    s.set_defaults(func=_capture)

    s = sub.add_parser("intervention-heads", help="resolve the target and control heads")
    s.add_argument("--model", required=True)
    s.add_argument("--target", default="auto", help="L<layer>H<head>, or auto")
    s.add_argument("--control", default="auto", help="L<layer>H<head>, or auto")
    s.add_argument("--capture-metrics", help="capture tables, for auto")
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_intervention_heads)

    s = sub.add_parser("intervention", help="query-scaling sweep of one head")
    s.add_argument("--model", required=True)
    s.add_argument("--manifest", required=True, help="the corpus stage's manifest.json")
    s.add_argument("--heads", required=True, help="heads.json from intervention-heads")
    s.add_argument("--head", required=True, help="L<layer>H<head>")
    s.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5])
    s.add_argument("--chunks", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--mass", type=float, default=0.9)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_intervention)

    s = sub.add_parser("gain", help="gain of the target and control sweeps")
    s.add_argument("--target", required=True)
    s.add_argument("--control", required=True)
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_gain)

    s = sub.add_parser("induction-scores", help="induction prompts and per-prompt head scores")
    s.add_argument("--model", required=True)
    s.add_argument("--model-info", required=True, help="the model's geometry (model-info)")
    s.add_argument("--families", nargs="+", default=["random", "names"])
    s.add_argument("--lags", type=int, nargs="+", default=[3, 4, 8, 16, 32])
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--per-lag", type=int, default=8, help="prompts per lag (and family)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True, help="scores.parquet")
    s.add_argument("--prompts-out", required=True, help="prompts.parquet")
    s.set_defaults(func=_induction_scores)

    s = sub.add_parser("induction-analysis", help="layer profile, bootstrap, nulls")
    s.add_argument("--scores", required=True)
    s.add_argument("--profile", default="mean", choices=["mean", "top"])
    s.add_argument("--quantile", type=float, default=0.9)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--permutations", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--profile-out", required=True)
    s.add_argument("--nulls-out", required=True)
    s.set_defaults(func=_induction_analysis)

    s = sub.add_parser("induction-causal", help="ablate top-k and random-k heads")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--profile", required=True, help="profile.json (head scores)")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--mode", default="zero", choices=["zero", "mean"])
    s.add_argument("--draws", type=int, default=5)
    s.add_argument("--n-prompts", type=int, default=16)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_induction_causal)

    s = sub.add_parser("niah-score", help="score prompts under one policy and sparsity")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True)
    _policy_args(s)
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.add_argument("--row-chunk", type=int, default=0, help="prompt rows per call (0: all)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_niah_score)

    s = sub.add_parser(
        "niah-cache", help="score prompts under every cache-regime run, one prefill each"
    )
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("--runs", required=True, help="JSON: [[policy, params, sparsity], ...]")
    s.add_argument("--tolerance", type=float, default=0.005)
    s.add_argument("--max-new-tokens", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    _device_arg(s)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_niah_cache)

    s = sub.add_parser("pareto-score", help="perplexity and latency of one policy and sparsity")
    s.add_argument("--model", required=True)
    s.add_argument("--manifest", required=True, help="the corpus stage's manifest.json")
    _policy_args(s)
    s.add_argument("--chunks", type=int, default=8, help="held-out chunks: the corpus's last")
    s.add_argument("--repeats", type=int, default=3, help="timed passes per chunk")
    s.add_argument("--regime", choices=["prefill", "cache"], default="prefill")
    s.add_argument(
        "--context",
        type=float,
        default=0.5,
        help="cache regime: share of each chunk densely prefilled; perplexity of the rest",
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=_pareto_score)

    s = sub.add_parser("pareto-table", help="perplexity with intervals and latency per run")
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("inputs", nargs="+", help="pareto-score tables")
    s.set_defaults(func=_pareto_table)

    s = sub.add_parser("ablation-table", help="NIAH accuracy and perplexity per policy variant")
    s.add_argument("--niah", nargs="+", required=True, help="niah-score tables")
    s.add_argument("--pareto", nargs="+", required=True, help="pareto-score tables")
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_ablation_table)

    s = sub.add_parser("frc-magnitude", help="coarse curvature and weight of a NIAH prompt")
    s.add_argument("--model", required=True)
    s.add_argument("--prompts", required=True, help="NIAH prompts.parquet")
    s.add_argument("--length", type=int, required=True)
    s.add_argument("--depth", type=float, required=True)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--adjacency", default="softmax", choices=["softmax", "scores", "dot"])
    s.add_argument("--graph", default="symmetric", choices=["symmetric", "directed", "rowsum"])
    s.add_argument("--threads", type=int, default=1)
    _device_arg(s)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_frc_magnitude)

    s = sub.add_parser("niah-table", help="concatenate NIAH score tables")
    s.add_argument("--out", required=True)
    s.add_argument("inputs", nargs="+")
    s.set_defaults(func=_niah_table)

    s = sub.add_parser(
        "niah-paired", help="each policy's accuracy against full attention and the best other"
    )
    s.add_argument("--table", required=True, help="a NIAH table (niah-table)")
    s.add_argument("--resamples", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_niah_paired)

    s = sub.add_parser("plot", help="render a figure from a table")
    s.add_argument(
        "figure",
        choices=[
            "niah-heatmap",
            "niah-summary",
            "niah-tasks",
            "niah-length",
            "niah-latency",
            "niah-recall",
            "capture-entropy",
            "capture-qnorm_entropy",
            "capture-keff",
            "capture-sink",
            "intervention",
            "gain",
            "induction-heatmap",
            "induction-profile",
            "induction-nulls",
            "induction-cross-model",
            "induction-causal",
            "induction-lag",
            "pareto",
            "ablation",
            "frc-magnitude",
        ],
    )
    s.add_argument(
        "--table",
        required=True,
        nargs="+",
        help="a table, or the capture metrics folder; intervention: target and control sweeps",
    )
    s.add_argument("--sparsity", type=float, default=0.99)
    s.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_plot)

    sub.add_parser("bench", add_help=False, help="benchmarks: attnlab bench kernels --help")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # the benchmarks parse their own arguments
            from attnlab import bench

            bench.main(argv[1:])
            return 0
        args = parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
