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
        name=model_name,
        policy_params=policy_params,
        sparsity=target_sparsity,
        tolerance=NIAH["sparsity_tolerance"],
        chunks=PARETO["chunks"],
        repeats=PARETO["repeats"],
        context=PARETO["context"],
        seed=config["seed"],
        device=config["device"],
        dtype=config["dtype"],
    shell:
        "attnlab pareto-score --model {params.name} --manifest {input.manifest}"
        " --policy {wildcards.policy} --policy-params '{params.policy_params}'"
        " --sparsity {params.sparsity} --tolerance {params.tolerance}"
        " --regime {wildcards.regime} --context {params.context}"
        " --chunks {params.chunks} --repeats {params.repeats} --seed {params.seed}"
        " --threads {threads} --device {params.device} --dtype {params.dtype} --out {output} 2> {log}"


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
        resamples=PARETO["bootstrap"],
        seed=config["seed"],
    shell:
        "attnlab pareto-table --resamples {params.resamples} --seed {params.seed}"
        " --out {output} {input.runs} 2> {log}"


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
        resamples=PARETO["bootstrap"],
        seed=config["seed"],
    shell:
        "attnlab ablation-table --niah {input.niah} --pareto {input.pareto}"
        " --resamples {params.resamples} --seed {params.seed} --out {output} 2> {log}"


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
