# Figures, each rendered from a table alone.


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
        resamples=NIAH["bootstrap"],
        seed=config["seed"],
    shell:
        "attnlab niah-paired --table {input.table} --resamples {params.resamples}"
        " --seed {params.seed} --out {output} 2> {log}"


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


rule niah_recall:
    input:
        table="results/niah/niah.parquet",
        code=figure_code("niah-recall"),
    output:
        report(
            "figs/niah_recall.png",
            caption="../report/niah_recall.rst",
            category="Needle in a haystack",
        ),
    log:
        "logs/figures/niah_recall.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot niah-recall --table {input.table} --out {output} 2> {log}"


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


# The long-context study (configs/long_context.yaml, run on a GPU): figures from its
# committed table, on any machine (its heatmaps: rule niah_heatmap).


rule long_context_length:
    input:
        table=NIAH_TABLES["long_context"],
        code=figure_code("niah-length"),
    output:
        report(
            "figs/long_context_length.png",
            caption="../report/long_context_length.rst",
            category="Needle in a haystack",
            subcategory="long context",
        ),
    log:
        "logs/figures/long_context_length.log",
    conda:
        "../envs/attnlab.yaml"
    params:
        seed=config["seed"],
    shell:
        "attnlab plot niah-length --table {input.table} --seed {params.seed}"
        " --out {output} 2> {log}"


rule long_context_latency:
    input:
        table=NIAH_TABLES["long_context"],
        bench="results_ref/long_context/prefill_latency.parquet",
        code=figure_code("niah-latency"),
    output:
        report(
            "figs/long_context_latency.png",
            caption="../report/long_context_latency.rst",
            category="Needle in a haystack",
            subcategory="long context",
        ),
    log:
        "logs/figures/long_context_latency.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot niah-latency --table {input.table} {input.bench} --out {output} 2> {log}"


rule long_context_recall:
    input:
        table=NIAH_TABLES["long_context"],
        code=figure_code("niah-recall"),
    output:
        report(
            "figs/long_context_recall.png",
            caption="../report/niah_recall.rst",
            category="Needle in a haystack",
            subcategory="long context",
        ),
    log:
        "logs/figures/long_context_recall.log",
    conda:
        "../envs/attnlab.yaml"
    shell:
        "attnlab plot niah-recall --table {input.table} --out {output} 2> {log}"
