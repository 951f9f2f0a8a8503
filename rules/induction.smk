# Induction heads: per-prompt head scores, profile with bootstrap and nulls, causal check.


rule induction_scores:
    input:
        info="results/models/{model}.json",
        code=module_sources(
            "cli", "induction", "attention", "models", root=workflow.basedir
        ),
    output:
        scores="results/induction/{model}/scores.parquet",
        prompts="results/induction/{model}/prompts.parquet",
    log:
        "logs/induction/{model}_scores.log",
    benchmark:
        "benchmarks/induction/{model}_scores.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job("induction-scores", model=model_name),
    shell:
        "attnlab induction-scores --job {params.job:q} --model-info {input.info}"
        " --threads {threads} --out {output.scores} --prompts-out {output.prompts} 2> {log}"


rule induction_analysis:
    input:
        scores="results/induction/{model}/scores.parquet",
        code=module_sources("cli", "robustness", root=workflow.basedir),
    output:
        profile="results/induction/{model}/profile.json",
        nulls="results/induction/{model}/nulls.json",
    log:
        "logs/induction/{model}_analysis.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        job=job("induction-analysis"),
    shell:
        "attnlab induction-analysis --job {params.job:q} --scores {input.scores}"
        " --profile-out {output.profile} --nulls-out {output.nulls} 2> {log}"


rule induction_causal:
    input:
        prompts="results/induction/{model}/prompts.parquet",
        profile="results/induction/{model}/profile.json",
        code=module_sources("cli", "causal", "models", root=workflow.basedir),
    output:
        "results/induction/{model}/causal.json",
    log:
        "logs/induction/{model}_causal.log",
    benchmark:
        "benchmarks/induction/{model}_causal.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job("induction-causal", model=model_name),
    shell:
        "attnlab induction-causal --job {params.job:q} --prompts {input.prompts}"
        " --profile {input.profile} --threads {threads} --out {output} 2> {log}"


rule induction_model_figure:
    input:
        profile="results/induction/{model}/profile.json",
        nulls="results/induction/{model}/nulls.json",
        code=module_sources("cli", "plots.induction", root=workflow.basedir),
    output:
        report(
            "figs/induction_{kind}_{model}.png",
            caption="../report/induction.rst",
            category="Induction heads",
        ),
    log:
        "logs/figures/induction_{kind}_{model}.log",
    wildcard_constraints:
        kind="heatmap|profile|nulls",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot induction-{wildcards.kind} --table {input.profile} {input.nulls}"
        " --out {output} 2> {log}"


rule induction_cross_figure:
    input:
        tables=lambda wc: induction_tables(wc.kind),
        code=module_sources("cli", "plots.induction", root=workflow.basedir),
    output:
        report(
            "figs/induction_{kind}.png",
            caption="../report/induction.rst",
            category="Induction heads",
        ),
    log:
        "logs/figures/induction_{kind}.log",
    wildcard_constraints:
        kind="cross_model|causal|lag",
    conda:
        "../envs/attnlab.yaml"
    params:
        figure=lambda wc: wc.kind.replace("_", "-"),
    shell:
        "attnlab plot induction-{params.figure} --table {input.tables} --out {output} 2> {log}"
