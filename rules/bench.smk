# Kernel benchmark: CAB's Triton predictor and flex block-sparse attention against dense
# attention (SDPA flash, SDPA cuDNN, flex causal). On a machine without CUDA the command
# runs its small CPU variant instead. Its code is the command line, the kernels and flex
# alone: an edit to the capture, corpus or model modules does not rerun it.


rule bench_kernels:
    input:
        code=module_sources(
            "cli", "bench", "bench.kernels", "plots.kernels", root=workflow.basedir
        ),
    output:
        table="results/bench/kernels.parquet",
        csv="results/bench/kernels.csv",
        fig=report(
            "figs/bench_kernels.png",
            caption="../report/bench_kernels.rst",
            category="Benchmarks",
        ),
    log:
        "logs/bench/kernels.log",
    benchmark:
        "benchmarks/bench/kernels.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        out_dir=subpath(output.table, parent=True),
    shell:
        "attnlab bench kernels --out {params.out_dir} --fig {output.fig} > {log} 2>&1"


# Decode benchmark: one generated token's attention over a 32k and a 128k cache, dense
# against each query-aware policy's select + gather + attend and an evicted cache of the
# same budget, on a Llama-3-8B-like layer and Gemma-3-270M's (torch only, no model).
rule bench_decode:
    input:
        code=module_sources(
            "cli", "bench", "bench.decode", "plots.decode", root=workflow.basedir
        ),
    output:
        table="results/bench/decode.parquet",
        csv="results/bench/decode.csv",
        fig=report(
            "figs/bench_decode.png",
            caption="../report/bench_decode.rst",
            category="Benchmarks",
        ),
    log:
        "logs/bench/decode.log",
    benchmark:
        "benchmarks/bench/decode.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        out_dir=subpath(output.table, parent=True),
    shell:
        "attnlab bench decode --out {params.out_dir} --fig {output.fig} > {log} 2>&1"


# Capture benchmark: the capture stage against output_attentions=True on the real models,
# tokens per second and peak memory side by side in one run (CPU).
rule bench_capture:
    input:
        code=module_sources(
            "cli", "bench", "bench.capture", "plots.bench", root=workflow.basedir
        ),
    output:
        table="results/bench/capture.parquet",
        csv="results/bench/capture.csv",
        fig=report(
            "figs/bench_capture.png",
            caption="../report/bench_capture.rst",
            category="Benchmarks",
        ),
    log:
        "logs/bench/capture.log",
    benchmark:
        "benchmarks/bench/capture.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        models=list(MODELS.values()),
        chunk_len=CORPUS["chunk_len"],
        mass=CAPTURE["mass"],
        out_dir=subpath(output.table, parent=True),
    shell:
        "attnlab bench capture --models {params.models} --threads {threads}"
        " --chunk-len {params.chunk_len} --mass {params.mass}"
        " --out {params.out_dir} --fig {output.fig} > {log} 2>&1"


# Real-model prefill latency at the longest NIAH length, per prefill-regime policy (block
# ones, then token-level ones in their row chunks) and NIAH sparsity beside full
# attention, timed on the config's device (the GPU profile gives it the card alone): the
# speed half of the NIAH study's latency figure.
rule bench_prefill:
    input:
        prompts="results/niah/{model}/prompts.parquet",
        code=module_sources("cli", "bench", "bench.prefill", root=workflow.basedir),
    output:
        table="results/bench/{model}/prefill.parquet",
        csv="results/bench/{model}/prefill.csv",
    log:
        "logs/bench/prefill_{model}.log",
    benchmark:
        "benchmarks/bench/prefill_{model}.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        name=model_name,
        length=max(NIAH["lengths"]),
        policies=latency_policies(),
        policy_params=latency_params(),  # each as its NIAH jobs run it (a variant too)
        sparsities=NIAH["sparsities"],
        row_chunk=NIAH["row_chunk"],  # a token-level policy's rows per call, as scored
        device=config["device"],
        dtype=config["dtype"],
        out_dir=subpath(output.table, parent=True),
    shell:
        "attnlab bench prefill --model {params.name} --prompts {input.prompts}"
        " --length {params.length} --policies {params.policies}"
        " --policy-params {params.policy_params:q} --row-chunk {params.row_chunk}"
        " --sparsities {params.sparsities} --threads {threads} --device {params.device}"
        " --dtype {params.dtype} --out {params.out_dir} > {log} 2>&1"


# A real model's per-token decode latency at the longest NIAH prompt, per cache-regime
# policy (the scored path: the policy's keep-mask over every cached key, every layer).
rule bench_generate:
    input:
        prompts="results/niah/{model}/prompts.parquet",
        code=module_sources("cli", "bench", "bench.generate", root=workflow.basedir),
    output:
        table="results/bench/{model}/generate.parquet",
        csv="results/bench/{model}/generate.csv",
    log:
        "logs/bench/generate_{model}.log",
    benchmark:
        "benchmarks/bench/generate_{model}.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: config["threads"]
    params:
        name=model_name,
        length=max(NIAH["lengths"]),
        policies=generate_policies(),
        sparsities=NIAH["sparsities"],
        device=config["device"],
        dtype=config["dtype"],
        out_dir=subpath(output.table, parent=True),
    shell:
        "attnlab bench generate --model {params.name} --prompts {input.prompts}"
        " --length {params.length} --policies {params.policies}"
        " --sparsities {params.sparsities} --threads {threads} --device {params.device}"
        " --dtype {params.dtype} --out {params.out_dir} > {log} 2>&1"
