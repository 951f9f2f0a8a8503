"""What a sparse run records: the (query, key) pairs its policy kept against the causal
pairs and those the model's own mask hides (the achieved sparsity), and at its answering
rows (the last prompt row in the ``prefill`` regime, every generated token's row in
``cache``) how much of full attention's weight its policy kept against the oracle at the
same budget, how much of the weight on the needle it kept over the retrieval heads, and
whether it kept a needle token at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# a retrieval head puts at least this share of an answering row's full attention on the
# needle's tokens (SparseRun.needle_recall)
RETRIEVAL_SHARE = 0.05


@dataclass(kw_only=True)
class Recorder:
    """The records of a :class:`attnlab.sparse.SparseRun` (``run.recorder``: the run
    chooses the keys, this counts and measures what it chose). ``watch``: the key
    positions of the needle's value tokens."""

    watch: Sequence[int] = ()
    kept: int = 0  # kept (query, key) pairs of the rows the policy acts on (or a 0-d tensor)
    causal: int = 0  # causal pairs of those rows
    hidden: int = 0  # causal pairs the model's own mask hides (sliding windows), or 0-d
    # per layer: sums over the answering rows of (kept mass, oracle overlap, oracle mass),
    # each (B * H,), and the number of rows (see record_recall)
    recall_sums: dict[int, list] = field(default_factory=dict)
    # per layer: sums over the answering rows of full attention's weight on the watched
    # keys and of the part the policy keeps, each (B * H,), and the rows (needle_recall)
    needle_sums: dict[int, list] = field(default_factory=dict)
    watch_kept: list[float] = field(default_factory=list)
    _watched: set[int] = field(default_factory=set)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of causal (query, key) pairs masked, by the policy or by the model's own
        mask, over every layer, head and row the policy acted on."""
        return 1.0 - float(self.kept) / self.causal if self.causal else 0.0

    @property
    def model_sparsity(self) -> float:
        """Fraction of those causal pairs that the model's own mask hides (sliding-window
        layers): the part of the achieved sparsity no policy chose."""
        return float(self.hidden) / self.causal if self.causal else 0.0

    def account(
        self, layer: int, keep: torch.Tensor, visible: torch.Tensor, answering: bool = True
    ) -> None:
        """Count kept, causal and model-hidden pairs of rows the policy acted on, and
        note, at the layer's first call whose last row is ``answering``, whether that row
        keeps the needle.

        keep: (B, H, Tq, Tk) bool (may be a broadcast view); visible: (B, 1, Tq, Tk).
        """
        b, h, tq, tk = keep.shape
        seen = int(torch.count_nonzero(visible))  # far faster than a bool sum
        if h > 1 and keep.stride(1) == 0:  # one mask broadcast over the heads: count once
            kept = int(torch.count_nonzero(keep[:, :1])) * h
        else:
            kept = int(torch.count_nonzero(keep))
        self.count(b, h, tq, tk, kept, seen)
        if answering:
            self.note_needle(layer, keep[:, :, -1], visible[:, :, -1])

    def account_visible(self, layer: int, h: int, tq: int, tk: int, seen: int, last) -> None:
        """Count a call that keeps every pair its model's mask shows (full attention's
        prefill) from that count alone: ``seen`` pairs over the batch, ``last`` (B, 1, Tk)
        the last row's visible keys (for the needle)."""
        self.count(last.shape[0], h, tq, tk, seen * h, seen)
        self.note_needle(layer, last.expand(-1, h, -1), last)

    def count(self, b: int, h: int, tq: int, tk: int, kept: int, seen: int) -> None:
        causal = (tq * (2 * tk - tq + 1)) // 2  # rows at tk - tq .. tk - 1 see p + 1 keys
        self.kept += kept
        self.causal += causal * b * h
        self.hidden += (causal * b - seen) * h

    def recall_by_layer(self) -> dict[str, list[float]]:
        """Per layer (in order) the mean over heads and answering rows of the attention
        mass the policy kept (``recall``), the overlap of its kept keys with the oracle's
        at the row's budget (``overlap``) and the oracle's own mass (``oracle``): see
        :meth:`record_recall`. Empty lists where nothing was recorded (full attention)."""
        out = {"recall": [], "overlap": [], "oracle": []}
        for layer in sorted(self.recall_sums):
            *sums, rows = self.recall_sums[layer]
            for name, total in zip(out, sums, strict=True):
                out[name].append(float(total.mean()) / rows)
        return out

    def record_recall(self, layer, q, k, visible, scaling, keep, budget) -> None:
        """Attention-mass recall of an answering row: the share of full attention's weight
        that falls on the keys the policy keeps, the share of the oracle's keys (the
        ``budget`` keys of largest weight) among them, and the oracle's own kept mass.

        q: (B, H, D) the row's queries; k: (B, H, Tk, D) keys expanded to the query heads;
        visible, keep: (B, 1|H, Tk) bool; budget: (B, 1|H) long (the oracle keeps at most
        the visible keys: all of a sliding window narrower than the budget). Summed per layer over
        the rows recorded (the last prompt row in the ``prefill`` regime, every generated
        token's row in ``cache``).
        """
        s = torch.einsum("bhd,bhkd->bhk", q.float(), k.float()) * scaling
        probs = torch.softmax(torch.where(visible, s, -float("inf")), dim=-1)  # (B, H, Tk)
        budget = torch.minimum(budget, visible.sum(-1))  # a window may show fewer keys
        n = int(budget.max())
        top_p, top_i = probs.topk(min(n, probs.shape[-1]), dim=-1)  # the oracle's keys
        in_budget = torch.arange(top_p.shape[-1], device=q.device) < budget.unsqueeze(-1)
        keep = keep.expand_as(probs)
        mass = (probs * keep).sum(-1).flatten()
        overlap = (keep.gather(-1, top_i) & in_budget).sum(-1) / in_budget.sum(-1)
        oracle = (top_p * in_budget).sum(-1).flatten()
        _accumulate(self.recall_sums, layer, [mass, overlap.flatten().float(), oracle, 1])
        if self.watch:
            on = probs[..., list(self.watch)]  # full attention's weight on the needle
            kept = (on * keep[..., list(self.watch)]).sum(-1).flatten()
            _accumulate(self.needle_sums, layer, [on.sum(-1).flatten(), kept, 1])

    @property
    def needle_recall(self) -> float:
        """Share of full attention's weight on the watched keys (the needle's value) that
        the policy keeps at the answering rows, over the retrieval heads: the (layer, head)
        pairs that put at least ``RETRIEVAL_SHARE`` of the answering rows' weight on those
        keys under full attention, on average. NaN where no head does, or nothing was
        recorded (full attention)."""
        on = kept = 0.0
        for weight, part, rows in self.needle_sums.values():
            heads = weight / rows >= RETRIEVAL_SHARE
            on, kept = on + float(weight[heads].sum()), kept + float(part[heads].sum())
        return kept / on if on else float("nan")

    @property
    def needle_kept(self) -> float:
        """Share of (layer, head) pairs whose answering row keeps a watched key, among
        the layers whose own mask lets that row see it."""
        return sum(self.watch_kept) / len(self.watch_kept) if self.watch_kept else float("nan")

    def note_needle(self, layer: int, kept: torch.Tensor, visible=None) -> None:
        """At a layer's first answering row, whether it keeps a watched key, per head.
        kept: (B, H, Tk) bool; visible: (B, 1|H, Tk), None when the row sees every key.
        Layers whose own window hides the needle from the row (sliding-window layers)
        have nothing a policy could keep and are not counted."""
        watch = list(self.watch)
        if not watch or layer in self._watched:
            return
        self._watched.add(layer)
        if visible is None or visible[..., watch].any():
            self.watch_kept.extend(kept[..., watch].any(-1).float().flatten().tolist())


def _accumulate(sums: dict[int, list], layer: int, new: list) -> None:
    """Add ``new`` (tensors and counts) to the running sums of ``layer``."""
    prev = sums.get(layer)
    sums[layer] = new if prev is None else [a + b for a, b in zip(prev, new, strict=True)]
