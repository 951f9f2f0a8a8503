# Coarse curvature against coarse attention weight: one NIAH prompt, one layer, CAB's
# block settings (attnlab.curvature).


rule curvature:
    input:
        prompts="results/niah/{model}/prompts.parquet",
        code=module_sources("cli", "curvature", "models", root=workflow.basedir),
    output:
        "results/curvature/{model}.parquet",
    log:
        "logs/curvature/{model}.log",
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job("curvature", model=model_name),
    shell:
        "attnlab curvature --job {params.job:q} --prompts {input.prompts}"
        " --threads {threads} --out {output} 2> {log}"


rule curvature_figure:
    input:
        table="results/curvature/{model}.parquet",
        code=figure_code("curvature"),
    output:
        report(
            "figs/curvature_{model}.png",
            caption="../report/curvature.rst",
            category="Curvature",
            subcategory="{model}",
        ),
    log:
        "logs/figures/curvature_{model}.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot curvature --table {input.table} --out {output} 2> {log}"
