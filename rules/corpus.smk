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
        name=model_name,
        source=CORPUS["source"],
        split=CORPUS["split"],
        keep_sets=CORPUS["keep_sets"],
        chunk_len=CORPUS["chunk_len"],
        max_chunks=CORPUS["max_chunks"],
        shard_size=CORPUS["shard_size"],
    shell:
        "attnlab corpus-shard --model {params.name} --source {params.source}"
        " --split {params.split} --keep-sets {params.keep_sets}"
        " --chunk-len {params.chunk_len} --max-chunks {params.max_chunks}"
        " --shard-size {params.shard_size} --shards {output.shards}"
        " --manifest {output.manifest} 2> {log}"
