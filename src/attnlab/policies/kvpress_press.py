"""Any scoring press of NVIDIA's kvpress library (0.5.5) as an attnlab policy."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from attnlab.errors import UserError
from attnlab.policies.base import Policy, ScoreContext
from attnlab.policies.selection import INF, select_tokens

INSTALL = (
    "kvpress is not installed; `make install` installs it, or by hand: "
    "python -m pip install 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' && "
    "python -m pip install --no-deps kvpress==0.5.5 "
    "(--no-deps: its declared transformers<5.3 would downgrade ours)"
)
# Presses whose score reads ``module.rotary_emb`` (the model's rotary embedding), which
# kvpress's own hooks attach to every attention module.
_ROTARY = ("ExpectedAttentionPress", "CapPress")
# Shown in the error for an unknown press.
EXAMPLES = ("KnormPress", "SnapKVPress", "StreamingLLMPress", "TOVAPress", "ExpectedAttentionPress")


def _kvpress():
    try:
        import kvpress
    except ImportError as e:
        raise UserError(INSTALL) from e
    return kvpress


def press_class(name: str) -> type:
    """The kvpress press class called ``name``, if attnlab can run it: a ``ScorerPress``
    that ranks keys from the attention module, its inputs, keys and values alone."""
    kvpress = _kvpress()
    cls = getattr(kvpress, name, None)
    if not (isinstance(cls, type) and issubclass(cls, kvpress.BasePress)):
        raise UserError(f"unknown kvpress press {name!r}; e.g. {', '.join(EXAMPLES)}")
    base = kvpress.ScorerPress
    if not issubclass(cls, base):
        raise UserError(f"kvpress press {name} does not score keys (not a ScorerPress)")
    if cls is base:
        raise UserError("kvpress press ScorerPress is abstract; name one of its subclasses")
    if issubclass(cls, kvpress.ObservedAttentionPress):
        raise UserError(f"kvpress press {name} needs the eager attention weights; not supported")
    if cls.compress is not base.compress:
        raise UserError(f"kvpress press {name} sets its own budgets (its compress); not supported")
    if cls.post_init_from_model is not kvpress.BasePress.post_init_from_model:
        raise UserError(f"kvpress press {name} needs the whole model to set up; not supported")
    return cls


def _rotary_emb(module: torch.nn.Module, device) -> torch.nn.Module | None:
    """A rotary embedding built from the module's config by its model's own class (what
    kvpress's hooks attach as ``module.rotary_emb``), or None where there is no one class."""
    found = [
        obj
        for key, obj in vars(sys.modules[type(module).__module__]).items()
        if key.endswith("RotaryEmbedding") and isinstance(obj, type)
    ]
    if len(found) != 1:
        return None
    return found[0](config=module.config).to(device)


def kept_count_ratio(n_kept: int, n_keys: int) -> float:
    """The compression ratio under which kvpress keeps ``n_kept`` of ``n_keys`` keys: its
    count is max(1, int(n_keys * (1 - ratio))), a truncation, so 1 - n_kept / n_keys is
    nudged down where float rounding would lose a key."""
    ratio = 1.0 - n_kept / n_keys
    while ratio > 0 and max(1, int(n_keys * (1 - ratio))) < n_kept:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


@dataclass
class KVPress(Policy):
    """A kvpress scoring press (``press``, e.g. "SnapKVPress") compresses the cache once,
    at the end of the prompt: each key/value head keeps the keys the press's ``score``
    ranks highest, up to the budget of the prompt's last row, and every generated key
    stays. The press scores from the model's own attention inputs and cached keys, as
    under kvpress's hooks, but the count kept is attnlab's rounded budget where kvpress
    truncates, the same wherever (1 - sparsity) * prompt length is whole.
    """

    name = "kvpress"
    label = "kvpress"
    evicts = True
    needs_inputs = True
    press: str = "KnormPress"
    """Class name of a kvpress ``ScorerPress`` (kvpress.presses)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of the press's constructor (compression_ratio comes from the run)."""

    def __post_init__(self) -> None:
        if "compression_ratio" in self.options:
            raise TypeError("compression_ratio is set by the run's sparsity, not in options")
        cls = press_class(self.press)
        try:
            self._press = cls(**self.options)
        except TypeError as e:
            raise TypeError(f"{self.press}: {e}") from e

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.history.kept is None and ctx.q.shape[-2] > 1:
            raise UserError(
                "kvpress presses run in the cache regime only (they compress a finished "
                f"prompt's cache once); got a prefill of {ctx.q.shape[-2]} rows"
            )
        # compressed once (or a one-token prompt): every cached key stays
        return torch.full(ctx.q.shape[:3] + ctx.k.shape[-2:-1], INF, device=ctx.q.device)

    def press_scores(self, ctx: ScoreContext) -> torch.Tensor:
        """The press's scores of the prompt's keys: (B, Hkv, T), higher is kept."""
        inputs = ctx.inputs
        if not inputs or inputs.get("hidden_states") is None:
            raise UserError(
                f"kvpress:{self.press} needs the attention's inputs: run the model after "
                "attnlab.attention.install(model)"
            )
        module, t = ctx.module, ctx.k.shape[-2]
        keys = ctx.k[:, :: ctx.groups]  # (B, Hkv, T, D): one head per key/value group
        press = self._press
        press.compression_ratio = kept_count_ratio(int(ctx.budget[..., -1].max()), t)
        if any(c.__name__ in _ROTARY for c in type(press).__mro__) and not hasattr(
            module, "rotary_emb"
        ):
            rotary = _rotary_emb(module, keys.device)
            if rotary is None:
                raise UserError(f"kvpress:{self.press} needs the model's rotary embedding")
            module.rotary_emb = rotary
        cache = inputs.get("cache", inputs.get("past_key_values"))
        kwargs = {  # the hook keyword names kvpress 0.5.5 reads (transformers 4.x)
            **inputs,
            "past_key_values": cache,
            "cache_position": torch.arange(t, device=keys.device),
        }
        with torch.no_grad():
            return press.score(module, inputs["hidden_states"], keys, ctx.value, None, kwargs)

    def compress(self, ctx: ScoreContext) -> torch.Tensor:
        scores = self.press_scores(ctx).float()  # (B, Hkv, T)
        score = scores.repeat_interleave(ctx.groups, dim=1).unsqueeze(-2)  # (B, H, 1, T)
        last = ctx.last_row()  # the last row's visible keys and budget
        return select_tokens(score, last.visible, last.budget)[..., 0, :]
