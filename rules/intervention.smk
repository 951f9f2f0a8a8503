# Query-scaling intervention: resolve the heads, sweep each, then gains and figures.


checkpoint intervention_heads:
    input:
        unpack(intervention_heads_input),
        code=module_sources("cli", "intervention", root=workflow.basedir),
    output:
        "results/intervention/{model}/heads.json",
    log:
        "logs/intervention/{model}_heads.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("intervention-heads", model=lambda w: w.model),
        metrics=capture_metrics_arg,
    shell:
        "attnlab intervention-heads --job {params.job:q} {params.metrics} --out {output} 2> {log}"


rule intervention_sweep:
    input:
        manifest="results/corpus/{model}/manifest.json",
        shards="results/corpus/{model}/shards",
        heads="results/intervention/{model}/heads.json",
        code=module_sources(
            "cli", "intervention", "attention", "models", root=workflow.basedir
        ),
    output:
        "results/intervention/{model}/{head}.parquet",
    log:
        "logs/intervention/{model}_{head}.log",
    benchmark:
        "benchmarks/intervention/{model}_{head}.tsv"
    wildcard_constraints:
        head=r"L\d+H\d+",
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job("intervention", model=model_name, head=lambda w: w.head),
    shell:
        "attnlab intervention --job {params.job:q} --manifest {input.manifest}"
        " --heads {input.heads} --threads {threads} --out {output} 2> {log}"


rule gain:
    input:
        unpack(sweep_files),
        code=module_sources("cli", "gain", root=workflow.basedir),
    output:
        "results/intervention/{model}/gain.parquet",
    log:
        "logs/intervention/{model}_gain.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("gain"),
        sweeps=sweep_args,
    shell:
        "attnlab gain --job {params.job:q} {params.sweeps} --out {output} 2> {log}"


rule intervention_figure:
    input:
        unpack(sweep_files),
        code=module_sources("cli", "plots.intervention", root=workflow.basedir),
    output:
        report(
            "figs/intervention_{model}.png",
            caption="../report/intervention.rst",
            category="Query scaling",
        ),
    log:
        "logs/figures/intervention_{model}.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        sweeps=lambda wildcards, input: sweep_args(wildcards, input, "--table"),
        seed=config["seed"],
    shell:
        "attnlab plot intervention {params.sweeps}"
        " --seed {params.seed} --out {output} 2> {log}"


rule gain_figure:
    input:
        table="results/intervention/{model}/gain.parquet",
        code=module_sources("cli", "plots.intervention", root=workflow.basedir),
    output:
        report(
            "figs/gain_{model}.png",
            caption="../report/gain.rst",
            category="Query scaling",
        ),
    log:
        "logs/figures/gain_{model}.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot gain --table {input.table} --out {output} 2> {log}"
