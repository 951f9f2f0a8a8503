# Coarse curvature against coarse attention weight: one NIAH prompt, one layer, CAB's
# block settings (attnlab.curvature).

CAB = policy_spec("cab")


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
        name=model_name,
        length=CURVATURE["length"],
        depth=CURVATURE["depth"],
        layer=CURVATURE["layer"],
        block_size=CAB["block_size"],
        adjacency=CAB["adjacency"],
        graph=CAB["graph"],
        device=config["device"],
        dtype=config["dtype"],
    shell:
        "attnlab curvature --model {params.name} --prompts {input.prompts}"
        " --length {params.length} --depth {params.depth} --layer {params.layer}"
        " --block-size {params.block_size} --adjacency {params.adjacency}"
        " --graph {params.graph} --threads {threads} --device {params.device} --dtype {params.dtype}"
        " --out {output} 2> {log}"


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
