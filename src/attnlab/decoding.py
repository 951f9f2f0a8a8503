"""Greedy decoding under a sparse run: prefill, decode, and runs that share a prefill."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnlab.sparse import SparseRun


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@torch.inference_mode()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, run: SparseRun):
    """The prompt's forward pass under ``run``; input_ids (1, T). Returns the cache and
    the last row's logits (V,).

    The cache is created without the model's config so it keeps every key (sliding-window
    layers are windowed by the mask, not by dropping keys), which keeps key positions
    absolute for the policies.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    with run:
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[0, -1]


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    cache,
    logits: torch.Tensor,
    run: SparseRun,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] = lambda ids: False,
) -> list[int]:
    """Greedy decoding of at most ``max_new_tokens`` under ``run`` from a prefilled
    ``cache`` and its last logits (V,); ``stop(new_ids)`` ends early."""
    eos, new = _eos(model), []
    device = logits.device
    with run:
        for step in range(max_new_tokens):
            nxt = int(logits.argmax())
            if nxt in eos:
                break
            new.append(nxt)
            if stop(new) or step == max_new_tokens - 1:
                break
            ids = torch.tensor([[nxt]], device=device)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
    return new


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    run: SparseRun,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] = lambda ids: False,
) -> list[int]:
    """Greedy decoding under ``run``: :func:`prefill`, then :func:`decode`."""
    cache, logits = prefill(model, input_ids, run)
    return decode(model, cache, logits, run, max_new_tokens, stop)


def generate_shared(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    runs: Sequence[SparseRun],
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] = lambda ids: False,
    leader: SparseRun | None = None,
) -> list[list[int]]:
    """Greedy decoding of one prompt under several ``cache``-regime runs that share one
    dense prefill: each run records what its policy needs from that prefill, then
    decodes from its own copy of the cache (the prefill's tensors, rewound after each).
    ``leader``: the full-attention run that computes the prefill (a ``prefill``-regime
    one accounts its prompt rows, as full attention's prefill-regime record); by default
    an unrecorded one. Returns each run's new tokens, in order."""
    from attnlab.policies.full import Full

    if any(not r.regime.dense_prefill for r in runs):
        raise ValueError("only cache-regime runs share a prefill")
    if leader is None:
        leader = SparseRun(Full(), regime="cache")
    if leader.policy.name != "full" or leader.followers:
        raise ValueError("the leader of a shared prefill is a full-attention run of its own")
    leader.followers = list(runs)
    cache, logits = prefill(model, input_ids, leader)
    t, out = input_ids.shape[-1], []
    for run in runs:
        out.append(decode(model, cache, logits, run, max_new_tokens, stop))
        rewind(cache, t)
    return out


def rewind(cache, length: int) -> None:
    """Drop what decoding appended to ``cache`` beyond its first ``length`` tokens. The
    prefill's tensors are never written in place (each step concatenates), so this gives
    back the prefilled cache without a copy."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
