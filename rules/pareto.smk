# Perplexity against latency per (regime, model, policy, sparsity); the CAB ablation
# table (both regimes); the curvature-against-weight figure of one NIAH prompt.


rule pareto_score:
    input:
        manifest="results/corpus/{model}/manifest.json",
        code=pareto_sources,
    output:
        "results/pareto/{regime}/{model}/{policy}_{pct}.parquet",
    log:
        "logs/pareto_score/{regime}/{model}/{policy}_{pct}.log",
    benchmark:
        "benchmarks/pareto_score/{regime}/{model}/{policy}_{pct}.tsv"
    wildcard_constraints:
        regime="prefill|cache",
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job(
            "pareto-score",
            model=model_name,
            policy=lambda w: w.policy,
            sparsity=target_sparsity,
            regime=lambda w: w.regime,
        ),
    shell:
        "attnlab pareto-score --job {params.job:q} --manifest {input.manifest}"
        " --threads {threads} --out {output} 2> {log}"


rule pareto_table:
    input:
        runs=pareto_files,
        code=module_sources("cli", "pareto", root=workflow.basedir),
    output:
        "results/pareto/{model}.parquet",
    log:
        "logs/pareto_table/{model}.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("pareto-table"),
    shell:
        "attnlab pareto-table --job {params.job:q} --inputs {input.runs} --out {output} 2> {log}"


rule ablation_table:
    input:
        unpack(ablation_inputs),
        code=module_sources("cli", "pareto", root=workflow.basedir),
    output:
        "results/ablation/{model}.parquet",
    log:
        "logs/ablation_table/{model}.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("ablation-table"),
    shell:
        "attnlab ablation-table --job {params.job:q} --niah {input.niah} --pareto {input.pareto}"
        " --out {output} 2> {log}"


rule pareto_figure:
    input:
        table="results/{kind}/{model}.parquet",
        code=module_sources("cli", "plots.pareto", root=workflow.basedir),
    output:
        report(
            "figs/{kind}_{model}.png",
            caption="../report/{kind}.rst",
            category="Perplexity and ablation",
            subcategory="{model}",
        ),
    log:
        "logs/figures/{kind}_{model}.log",
    wildcard_constraints:
        kind="pareto|ablation",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot {wildcards.kind} --table {input.table} --out {output} 2> {log}"
