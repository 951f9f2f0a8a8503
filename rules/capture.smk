# Capture: per-token attention metrics and Q/K of the corpus chunks, and their figures.


rule capture:
    input:
        manifest="results/corpus/{model}/manifest.json",
        shards="results/corpus/{model}/shards",
        code=module_sources(
            "cli", "capture", "metrics", "attention", "models", root=workflow.basedir
        ),
    output:
        metrics=directory("results/capture/{model}/metrics"),
        qk=directory("results/capture/{model}/qk"),
    log:
        "logs/capture/{model}.log",
    benchmark:
        "benchmarks/capture/{model}.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        job=job("capture", model=model_name),
    shell:
        "attnlab capture --job {params.job:q} --manifest {input.manifest}"
        " --metrics {output.metrics} --qk {output.qk} --threads {threads} 2> {log}"


rule capture_figure:
    input:
        metrics="results/capture/{model}/metrics",
        code=module_sources("cli", "plots.capture", root=workflow.basedir),
    output:
        report(
            "figs/capture_{model}_{kind}.png",
            caption="../report/capture.rst",
            category="Attention capture",
            subcategory="{model}",
        ),
    log:
        "logs/figures/capture_{model}_{kind}.log",
    wildcard_constraints:
        kind="entropy|qnorm_entropy|keff|sink",
    conda:
        "../envs/attnlab.yaml"
    params:
        resamples=CAPTURE["bootstrap"],
        seed=config["seed"],
    shell:
        "attnlab plot capture-{wildcards.kind} --table {input.metrics}"
        " --resamples {params.resamples} --seed {params.seed} --out {output} 2> {log}"
