# Needle-in-a-haystack: prompts per model; one rule scores them in either regime
# (results/<grid>/<regime>/<model>/<part>.parquet): the cache regime's part "all" is every
# run of the grid over one dense prefill per prompt (all_<i>of<n>: the i-th of
# niah.cache_shards jobs of every n-th prompt; the ablation's variants in a grid of their
# own), a prefill-regime part "<policy>_<pct>" one run; one table.


rule model_info:
    input:
        code=module_sources("cli", "models", root=workflow.basedir),
    output:
        "results/models/{model}.json",
    log:
        "logs/model_info/{model}.log",
    benchmark:
        "benchmarks/model_info/{model}.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: 2
    params:
        job=job("model-info", model=model_name),
    shell:
        "attnlab model-info --job {params.job:q} --out {output} 2> {log}"


rule niah_prompts:
    input:
        unpack(niah_haystack_input),
        info="results/models/{model}.json",
        code=module_sources("cli", "niah_jobs", root=workflow.basedir),
    output:
        "results/niah/{model}/prompts.parquet",
    log:
        "logs/niah_prompts/{model}.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("niah-prompts", model=model_name),
        corpus=niah_haystack_arg,
    shell:
        "attnlab niah-prompts --job {params.job:q} --model-info {input.info} {params.corpus}"
        " --out {output} 2> {log}"


rule niah_score:
    input:
        prompts="results/niah/{model}/prompts.parquet",
        code=niah_sources,
    output:
        "results/{grid}/{regime}/{model}/{part}.parquet",
    log:
        "logs/niah_score/{grid}/{regime}/{model}/{part}.log",
    benchmark:
        "benchmarks/niah_score/{grid}/{regime}/{model}/{part}.tsv"
    wildcard_constraints:
        grid="niah|ablation",
        regime="cache|prefill",
        part=NIAH_PART,
    # a grid's cache-regime job, its longest: first in line, so that it is not left to
    # run alone
    priority: lambda w: 10 if niah_all(w) else 0
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    resources:
        gpu_mem_gb=gpu_mem_gb,
    params:
        job=job(
            "niah-score",
            model=model_name,
            regime=lambda w: w.regime,
            runs=niah_runs,
            shard=niah_shard,
            # the prefill regime's rows per call: a cache job reads none, nor reruns for it
            row_chunk=lambda w: NIAH["row_chunk"] if w.regime == "prefill" else 0,
        ),
    shell:
        "attnlab niah-score --job {params.job:q} --prompts {input.prompts}"
        " --threads {threads} --out {output} 2> {log}"


rule niah_table:
    input:
        tables=niah_score_files(),
        code=module_sources("cli", "niah_jobs", root=workflow.basedir),
    output:
        "results/niah/niah.parquet",
    log:
        "logs/niah_table.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab niah-table --inputs {input.tables} --out {output} 2> {log}"


# Figures of the NIAH tables, each rendered from a table alone.


rule niah_heatmap:
    input:
        table=niah_table,
        code=figure_code("niah-heatmap"),
    output:
        report(
            "figs/{study}_heatmap_{pct}.png",
            caption="../report/niah_heatmap.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/{study}_heatmap_{pct}.log",
    wildcard_constraints:
        study="|".join(NIAH_TABLES),
    conda:
        "../envs/attnlab.yaml"
    params:
        sparsity=target_sparsity,
    shell:
        "attnlab plot niah-heatmap --table {input.table} --sparsity {params.sparsity}"
        " --out {output} 2> {log}"


rule niah_paired:
    input:
        table=niah_table,
        code=module_sources("cli", "niah_paired", root=workflow.basedir),
    output:
        "results/{study}/paired.parquet",
    log:
        "logs/niah_paired/{study}.log",
    wildcard_constraints:
        study="|".join(NIAH_TABLES),
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("niah-paired"),
    shell:
        "attnlab niah-paired --job {params.job:q} --table {input.table} --out {output} 2> {log}"


# The committed GPU study's accuracy-matched table (DESIGN: Accuracy-matched point) and its
# figure: each policy's highest sparsity keeping 90% of full attention's passkeys at the
# longest length, with the speedups measured for that selection (the attention's decode
# step: the committed H200 decode benchmark; the real model's: the study's own).
rule long_context_matched:
    input:
        table="results_ref/long_context/niah.parquet",
        decode="benchmarks_ref/decode_h200.csv",
        prefill="results_ref/long_context/prefill_latency.parquet",
        generate="results_ref/long_context/generate_latency.parquet",
        code=module_sources("cli", "matched", "plots.matched", root=workflow.basedir),
    output:
        table="results/long_context/matched.parquet",
        points="results/long_context/matched_points.parquet",
        fig=report(
            "figs/long_context_matched.png",
            caption="../report/long_context_matched.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/niah_matched/long_context.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab niah-matched --table {input.table} --decode {input.decode}"
        " --prefill {input.prefill} --generate {input.generate} --out {output.table}"
        " --fig {output.fig} 2> {log}"


rule niah_summary:
    input:
        table="results/niah/niah.parquet",
        paired="results/niah/paired.parquet",
        code=figure_code("niah-summary"),
    output:
        report(
            "figs/niah_summary.png",
            caption="../report/niah_summary.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/niah_summary.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        seed=config["seed"],
    shell:
        "attnlab plot niah-summary --table {input.table} {input.paired}"
        " --seed {params.seed} --out {output} 2> {log}"


rule niah_tasks:
    input:
        table="results/niah/niah.parquet",
        code=figure_code("niah-tasks"),
    output:
        report(
            "figs/niah_tasks.png",
            caption="../report/niah_tasks.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/niah_tasks.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        seed=config["seed"],
    shell:
        "attnlab plot niah-tasks --table {input.table} --seed {params.seed}"
        " --out {output} 2> {log}"


# Figures of a whole study's table: the pipeline's (study "niah") and the committed GPU
# studies' (results_ref/long_context and results_ref/oracle_gap, on any machine).


rule niah_length:
    input:
        table=niah_table,
        code=figure_code("niah-length"),
    output:
        report(
            "figs/{study}_length.png",
            caption="../report/long_context_length.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/{study}_length.log",
    wildcard_constraints:
        study="|".join(NIAH_TABLES),
    conda:
        "../envs/attnlab.yaml"
    params:
        seed=config["seed"],
    shell:
        "attnlab plot niah-length --table {input.table} --seed {params.seed}"
        " --out {output} 2> {log}"


rule niah_latency:
    input:
        table=niah_table,
        bench=prefill_latency_table,
        code=figure_code("niah-latency"),
    output:
        report(
            "figs/{study}_latency.png",
            caption="../report/long_context_latency.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/{study}_latency.log",
    wildcard_constraints:
        study="|".join(NIAH_TABLES),
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot niah-latency --table {input.table} {input.bench} --out {output} 2> {log}"


rule niah_recall:
    input:
        table=niah_table,
        code=figure_code("niah-recall"),
    output:
        report(
            "figs/{study}_recall.png",
            caption="../report/niah_recall.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/{study}_recall.log",
    wildcard_constraints:
        study="|".join(NIAH_TABLES),
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot niah-recall --table {input.table} --out {output} 2> {log}"


# The whole NIAH study of a config in one target: its table, the prefill latency table,
# every figure. The long-context study on a GPU machine:
#   snakemake --profile profiles/gpu --configfile=configs/long_context.yaml niah_study
rule niah_study:
    input:
        niah_study_targets(),
