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
        name=model_name,
        families=INDUCTION["families"],
        lags=INDUCTION["lags"],
        seq_len=INDUCTION["seq_len"],
        per_lag=INDUCTION["per_lag"],
        batch_size=INDUCTION["batch_size"],
        seed=config["seed"],
    shell:
        "attnlab induction-scores --model {params.name} --model-info {input.info}"
        " --families {params.families}"
        " --lags {params.lags} --seq-len {params.seq_len} --per-lag {params.per_lag}"
        " --batch-size {params.batch_size} --seed {params.seed} --threads {threads}"
        " --out {output.scores} --prompts-out {output.prompts} 2> {log}"


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
        profile=INDUCTION["profile"],
        quantile=INDUCTION["quantile"],
        bootstrap=INDUCTION["bootstrap"],
        permutations=INDUCTION["permutations"],
        seed=config["seed"],
    shell:
        "attnlab induction-analysis --scores {input.scores} --profile {params.profile}"
        " --quantile {params.quantile} --bootstrap {params.bootstrap}"
        " --permutations {params.permutations} --seed {params.seed}"
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
        name=model_name,
        k=INDUCTION["causal"]["k"],
        mode=INDUCTION["causal"]["mode"],
        draws=INDUCTION["causal"]["draws"],
        prompts=INDUCTION["causal"]["prompts"],
        bootstrap=INDUCTION["bootstrap"],
        batch_size=INDUCTION["batch_size"],
        seed=config["seed"],
    shell:
        "attnlab induction-causal --model {params.name} --prompts {input.prompts}"
        " --profile {input.profile} --k {params.k} --mode {params.mode}"
        " --draws {params.draws} --n-prompts {params.prompts}"
        " --bootstrap {params.bootstrap} --batch-size {params.batch_size}"
        " --seed {params.seed} --threads {threads} --out {output} 2> {log}"


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
