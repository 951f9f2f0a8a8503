"""Sparse-attention policies: one module each, and nothing else to touch.

A policy is a dataclass in its own module of this package (:mod:`attnlab.policies.fields`
reads its name, label and parameters from the source). :func:`make` imports only the
module of the policy it builds; ``REGISTRY`` (every class by name) imports them all.
"""

from __future__ import annotations

from importlib import import_module

from attnlab.errors import UserError
from attnlab.policies import fields


def policy_class(name: str) -> type:
    """The class of the registered policy ``name`` (``kvpress:<Press>``: the kvpress one),
    its module imported now."""
    pi = fields.info(name)
    return getattr(import_module(f"attnlab.policies.{pi.module}"), pi.cls)


def make(name: str, **params):
    """Build a policy by registry name with the given hyper-parameters, checked against
    its dataclass's fields (:func:`attnlab.policies.fields.check`; a bad one raises a
    one-line UserError).

    A ``base`` parameter names the registry policy of a variant (a config entry such as
    ``cab_lam30: {base: cab, lam: 0.3}``), so one policy can be scored under several
    settings side by side. A name ``kvpress:<Press>`` runs kvpress's scoring press of
    that class (its constructor's arguments go in ``options``).
    """
    name = params.pop("base", name)
    params = fields.check(name, params)
    if name.startswith("kvpress:"):
        params["press"] = name.removeprefix("kvpress:")
    try:
        return policy_class(name)(**params)
    except TypeError as e:
        raise UserError(f"policy {name!r}: {e}") from e


def __getattr__(attr: str):
    """``REGISTRY``: every registered policy class by name (imports every policy module);
    ``Policy``, ``ScoreContext``, ``keep_mask``: from :mod:`attnlab.policies.base`."""
    if attr == "REGISTRY":
        return {n: policy_class(n) for n in fields.registry() if n != "kvpress"}
    if attr in ("Policy", "ScoreContext", "keep_mask"):
        return getattr(import_module("attnlab.policies.base"), attr)
    raise AttributeError(f"module 'attnlab.policies' has no attribute {attr!r}")


__all__ = ["REGISTRY", "Policy", "ScoreContext", "keep_mask", "make", "policy_class"]
