"""Sparse-attention policies: one module each, one registry line each."""

from __future__ import annotations

from attnlab.errors import UserError
from attnlab.policies.base import Policy, ScoreContext, keep_mask
from attnlab.policies.cab import CAB
from attnlab.policies.coarse_magnitude import CoarseMagnitude
from attnlab.policies.full import Full
from attnlab.policies.h2o import H2O
from attnlab.policies.quest import Quest
from attnlab.policies.random_block import RandomBlock
from attnlab.policies.snapkv import SnapKV
from attnlab.policies.streamingllm import StreamingLLM
from attnlab.policies.topk import TopK
from attnlab.policies.xattention import XAttention

REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        Full,
        TopK,
        H2O,
        StreamingLLM,
        CAB,
        CoarseMagnitude,
        RandomBlock,
        SnapKV,
        Quest,
        XAttention,
    )
}


def make(name: str, **params) -> Policy:
    """Build a policy by registry name with the given hyper-parameters.

    A ``base`` parameter names the registry policy of a variant (a config entry such as
    ``cab_lam30: {base: cab, lam: 0.3}``), so one policy can be scored under several
    settings side by side. A name ``kvpress:<Press>`` runs kvpress's scoring press of
    that class (``KVPress``; its constructor's arguments go in ``options``).
    """
    name = params.pop("base", name)
    if name.startswith("kvpress:"):
        from attnlab.policies.kvpress_press import KVPress

        try:
            return KVPress(press=name.removeprefix("kvpress:"), **params)
        except TypeError as e:
            raise UserError(f"policy {name!r}: {e}") from e
    if name not in REGISTRY:
        raise UserError(f"unknown policy {name!r}; known: {', '.join(REGISTRY)}")
    try:
        return REGISTRY[name](**params)
    except TypeError as e:
        raise UserError(f"policy {name!r}: {e}") from e


__all__ = ["REGISTRY", "Policy", "ScoreContext", "keep_mask", "make"]
