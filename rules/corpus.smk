# Corpus sharding: filtered, tokenized, fixed-length chunks per model's tokenizer.


rule corpus_shards:
    input:
        info="results/models/{model}.json",
        source=corpus_local_source,
        code=module_sources("cli", "corpus", root=workflow.basedir),
    output:
        manifest="results/corpus/{model}/manifest.json",
        shards=directory("results/corpus/{model}/shards"),
    log:
        "logs/corpus/{model}.log",
    benchmark:
        "benchmarks/corpus/{model}.tsv"
    conda:
        "../envs/attnlab.yaml"
    threads: 2
    params:
        job=job("corpus-shard", model=model_name),
    shell:
        "attnlab corpus-shard --job {params.job:q} --shards {output.shards}"
        " --manifest {output.manifest} 2> {log}"
