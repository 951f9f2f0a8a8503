"""Tiny random-weight models of the two architectures the pipeline runs (Llama: every
layer causal; Gemma 3: sliding-window layers with a global one), built in the test
session from a config and a seed: no download, milliseconds a forward pass. The unit
tests of attention, policies, regimes, causality, recall and accounting run on them;
the real models' tests are marked ``e2e``."""

from __future__ import annotations

import torch

VOCAB = 6000  # the tests' token ids go up to 5216
WINDOW = 24  # Gemma's sliding window here: rows past it see only their last 24 keys
# weights 5x transformers' default spread, so that attention is peaked, not near uniform
# (near-uniform weights would make every selection a near tie)
INIT = 0.1
# what both architectures share: hidden size 64, 4 query heads of dimension 16
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=INIT,
)


def tiny_llama(seed: int = 0):
    """Llama: 2 layers, 4 query heads over 2 key/value heads (GQA), head dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**COMMON, num_hidden_layers=2, num_key_value_heads=2)
    return _build(LlamaForCausalLM, config, seed)


def tiny_gemma3(seed: int = 0, window_layers: int = 2):
    """Gemma 3: ``window_layers`` sliding-window layers (WINDOW keys) then a global one,
    4 query heads over one key/value head, head dim 16."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=window_layers + 1,
        num_key_value_heads=1,
        sliding_window=WINDOW,
        layer_types=["sliding_attention"] * window_layers + ["full_attention"],
    )
    return _build(Gemma3ForCausalLM, config, seed)


def _build(cls, config, seed: int):
    from attnlab import attention

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).float().eval()
    return attention.install(model)
