# Needle-in-a-haystack: prompts per model, scores per (model, policy, sparsity), one table.


rule model_info:
    output:
        "results/models/{model}.json",
    input:
        code=module_sources("models", root=workflow.basedir),
    params:
        name=model_name,
    log:
        "logs/model_info/{model}.log",
    benchmark:
        "benchmarks/model_info/{model}.tsv"
    threads: 2
    shell:
        "attnlab model-info --model {params.name} --out {output} 2> {log}"


rule niah_prompts:
    output:
        "results/niah/{model}/prompts.parquet",
    input:
        info="results/models/{model}.json",
        code=module_sources("niah", root=workflow.basedir),
    params:
        name=model_name,
        lengths=NIAH["lengths"],
        depths=NIAH["depths"],
        samples=NIAH["samples"],
        haystack=NIAH["haystack"],
        seed=config["seed"],
    log:
        "logs/niah_prompts/{model}.log",
    shell:
        "attnlab niah-prompts --model {params.name} --model-info {input.info}"
        " --lengths {params.lengths} --depths {params.depths} --samples {params.samples}"
        " --haystack {params.haystack} --seed {params.seed} --out {output} 2> {log}"


rule niah_score:
    output:
        "results/niah/{model}/{policy}_{pct}.parquet",
    input:
        prompts="results/niah/{model}/prompts.parquet",
        code=niah_sources,
    params:
        name=model_name,
        policy_params=policy_params,
        sparsity=target_sparsity,
        tolerance=NIAH["sparsity_tolerance"],
        max_new_tokens=NIAH["max_new_tokens"],
        seed=config["seed"],
    log:
        "logs/niah_score/{model}/{policy}_{pct}.log",
    benchmark:
        "benchmarks/niah_score/{model}/{policy}_{pct}.tsv"
    threads: 2
    shell:
        "attnlab niah-score --model {params.name} --prompts {input.prompts}"
        " --policy {wildcards.policy} --policy-params '{params.policy_params}'"
        " --sparsity {params.sparsity} --tolerance {params.tolerance}"
        " --max-new-tokens {params.max_new_tokens} --seed {params.seed}"
        " --threads {threads} --out {output} 2> {log}"


rule niah_table:
    output:
        "results/niah/niah.parquet",
    input:
        niah_score_files(),
    log:
        "logs/niah_table.log",
    shell:
        "attnlab niah-table --out {output} {input} 2> {log}"
