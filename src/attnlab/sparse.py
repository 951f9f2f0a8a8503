"""A sparse-attention run: a policy at a target sparsity in a regime (DESIGN: Regime).

A :class:`SparseRun` is a context manager; while it is active, the ``attnlab`` attention
(:mod:`attnlab.attention`) applies its policy where its regime (:mod:`attnlab.regimes`)
says the policy acts: after a dense prefill (``cache``: each generated token chooses from
the whole cache, an eviction policy compresses it once at the end of the prompt and never
re-admits a key) or on every prompt row (``prefill``: the regime of perplexity and the GPU
kernels; a block policy chooses once per query block, :meth:`SparseRun.block_selection`,
on every device the selection FlexAttention runs on the GPU, in its selection form).

For each call where the policy acts the run builds the keep-mask under the per-row budget
(a row at position p keeps about (1 - s)(p + 1) keys) on top of the model's own mask
(causality, sliding windows). Its :class:`~attnlab.recall.Recorder` (``run.recorder``)
records the kept pairs against the causal pairs of those rows (the achieved sparsity,
measured), those the model's own mask hides (``model_sparsity``), and at the answering
rows how much of full attention's weight its policy kept, per layer.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnlab import regimes
from attnlab.block_prefill import BlockPrefill
from attnlab.blocks import visible_per_block
from attnlab.errors import UserError
from attnlab.masks import ModelMask
from attnlab.phases import phase
from attnlab.policies.base import LayerHistory, Policy, ScoreContext, keep_mask, row_budget
from attnlab.policies.selection import keep_blocks_by_budget, twilight
from attnlab.recall import Recorder
from attnlab.regimes import Regime

_ACTIVE: contextvars.ContextVar[SparseRun | None] = contextvars.ContextVar(
    "sparse_run", default=None
)


def active() -> SparseRun | None:
    """The run whose ``with`` block is executing, or None."""
    return _ACTIVE.get()


@dataclass
class SparseRun(BlockPrefill):
    """A policy at a target sparsity in a regime, applied while the run is active (``with run:``).

    ``watch``: key positions (the needle's value tokens) whose retention by the answering
    row (the last prompt row in ``prefill``, the first generated token's in ``cache``) is
    recorded per layer and head (``needle_kept``). ``followers``: ``cache``-regime runs that
    share this run's dense prefill (a full-attention run's), each recording from it what
    its policy needs (:func:`generate_shared`).
    """

    policy: Policy
    sparsity: float = 0.0
    seed: int = 0
    watch: Sequence[int] = ()
    regime: Regime | str = "prefill"  # a name is replaced by its Regime
    decode: str = "dense"  # prefill regime: decode steps "dense" or under the "policy"
    # the kernel of a block policy's prefill (one selection whichever runs): "auto",
    # FlexAttention on CUDA and a keep-mask elsewhere; "eager", a keep-mask; "flex" anywhere
    backend: str = "auto"
    # rows per attention call of a token-level policy (0: a call's rows at once); an
    # evicting policy then drops keys between these calls only (see chunked_attention)
    row_chunk: int = 0
    # the prompt is given whole and answered after it (NIAH): a block policy may choose in
    # its prompt form (policies.base.selection_form); ``selection``: the prefill's form
    whole_prompt: bool = False
    records: bool = True  # recall at the answering rows (False: timing the policy alone)
    # fused: a GPU prefill's selection and lists in one Triton kernel (kernels.budget), else
    # in PyTorch; tiles, the window layers' (the same pairs): "whole" rows (past the budget's
    # reach) apart, "block" tiles of the block alone, "window" flex.WINDOW_TILE,
    # "auto" whole under windows.WHOLE_BELOW-token blocks, else block
    fused: bool = True
    tiles: str = "auto"
    selection: str = field(init=False, default="causal")
    followers: list[SparseRun] = field(default_factory=list)
    recorder: Recorder = field(init=False)  # the pairs kept, recall, the needle diagnostic
    kernels: dict[str, int] = field(default_factory=dict)  # layer calls per attention kernel
    histories: dict[int, LayerHistory] = field(default_factory=dict)
    # a causal prefill's rows and counts per (length, device), read by every causal layer
    _causal_cache: dict = field(default_factory=dict, repr=False)
    _token: contextvars.Token | None = None

    def __post_init__(self) -> None:
        self.recorder = Recorder(watch=self.watch)
        self.regime = regimes.get(self.regime)
        if self.decode not in ("dense", "policy"):
            raise ValueError(f"decode must be 'dense' or 'policy', got {self.decode!r}")
        if self.tiles not in ("auto", "whole", "block", "window"):
            raise ValueError(f"tiles must be auto, whole, block or window, got {self.tiles!r}")
        if self.row_chunk < 0:
            raise ValueError(f"row_chunk must be >= 0, got {self.row_chunk}")
        if twilight(self.policy) and not self.regime.dense_prefill:
            raise UserError(
                f"{self.policy.name}: top_p (Twilight's budget mode) prunes the keys chosen"
                " per generated token: the cache regime only"
            )
        self.selection = self.regime.selection(self.policy, self.whole_prompt)

    def __enter__(self) -> SparseRun:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def acts(self, layer: int) -> bool:
        """Whether the policy acts on this layer's next call (a layer's first: its prefill)."""
        return self.regime.acts(layer not in self.histories, self.decode)

    def leaves_dense(self, module, attention_mask) -> bool:
        """Whether this layer runs as under full attention, its pairs counted as kept: a
        sliding-window layer (the model's own mask is a window) under a policy that acts
        on the global layers only (``window_layers`` False)."""
        if getattr(self.policy, "window_layers", True):
            return False
        # a layer's window, not its padding: a padded global layer stays the policy's
        return getattr(module, "sliding_window", None) is not None or (
            isinstance(attention_mask, ModelMask)
            and attention_mask.recipe.get("local_size") is not None
        )

    @property
    def needs_inputs(self) -> bool:
        """Whether this run's policy, or a follower's, reads the attention's inputs."""
        return any(r.policy.needs_inputs for r in [self, *self.followers])

    def took(self, kernel: str, tq: int) -> None:
        """Count a multi-row call (a prefill's layer) by the attention kernel it took."""
        if tq > 1:
            self.kernels[kernel] = self.kernels.get(kernel, 0) + 1

    def chunks(self, tq: int) -> bool:
        """Whether a masked call of ``tq`` rows runs in row chunks (:func:`chunked_attention`)."""
        return 0 < self.row_chunk < tq and self.policy.level == "token"

    def _context(
        self,
        layer,
        q,
        k,
        visible,
        scaling,
        kv_heads=None,
        module=None,
        value=None,
        rows=None,
        cache=None,
    ) -> ScoreContext:
        tq, tk = q.shape[-2], k.shape[-2]
        store = {} if cache is None else cache  # once per forward pass where there is one
        key = ("budgets", tq, tk, self.sparsity)
        if key not in store:
            q_pos = torch.arange(tk - tq, tk, device=q.device)  # the cache holds every key
            store[key] = q_pos, row_budget(q_pos + 1, self.sparsity)[None, None]  # (1, 1, Tq)
        q_pos, budget = store[key]
        return ScoreContext(
            q=q,
            k=k,
            visible=visible,
            q_pos=q_pos,
            budget=budget,
            scaling=scaling,
            layer=layer,
            seed=self.seed,
            history=self.histories.setdefault(layer, LayerHistory()),
            kv_heads=kv_heads,
            module=module,
            value=value,
            inputs=getattr(module, "_attnlab_inputs", None),
            row_eviction=self.row_chunk == 0,
            row_mask=rows,
            mask_cache=cache,
        )

    def mask(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        visible: torch.Tensor,
        scaling: float,
        scores: torch.Tensor | None,
        kv_heads: int | None = None,
        module=None,
        value: torch.Tensor | None = None,
        answering: bool = True,
    ) -> torch.Tensor:
        """Keep-mask for one layer call; q: (B, H, Tq, D), k: (B, H, Tk, D) -> (B, H, Tq, Tk).
        ``answering``: the call's last row is the answering row (not so for a chunk of a
        longer call, see :meth:`account`)."""
        with phase("selection"):  # on every path (fused, row chunks, eager)
            ctx = self._context(layer, q, k, visible, scaling, kv_heads, module, value)
            if scores is not None:  # already computed for the attention itself
                ctx.provide(scores=scores)
            if self.policy.level == "block" and q.shape[-2] == k.shape[-2]:  # a prefill
                bs, t = self.policy.block_size, q.shape[-2]
                blocks = self.block_selection(ctx)  # (B, H, Mq, Mk), as FlexAttention runs it
                keep = blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :t, :t]
                keep = keep & visible
            else:
                keep = keep_mask(self.policy, ctx)  # (B, H, Tq, Tk)
        if self.policy.evicts:
            ctx.history.kept = keep[..., -1, :]  # the cache after these rows
        recall = self.regime.records_recall(layer not in self.recorder.recall_sums)
        if answering and self.records and recall:
            self.recorder.record_recall(
                layer,
                q[..., -1, :],
                k,
                visible[..., -1, :],
                scaling,
                keep[..., -1, :],
                ctx.budget[..., -1],
            )
        self.policy.remember(ctx)
        self.recorder.account(layer, keep, visible, answering)
        return keep

    def observe_dense(
        self, layer, q, k, visible, scaling, kv_heads=None, module=None, value=None, probs=None
    ) -> None:
        """A dense prefill in the ``cache`` regime: record what the policy needs for the
        generated tokens (earlier queries, received attention) and, for an eviction
        policy, compress the cache to the budget of the prompt's last row. Each follower
        does the same from this one prefill.

        q: (B, H, T, D), k: (B, H, T, D) expanded keys; probs: (B, H, T, T) when the
        caller has them, else what a policy reads is computed in row chunks.
        """
        shared = {} if probs is None else {"probs": probs}  # computed once for all runs
        runs = [self] * self.regime.dense_prefill + self.followers
        for run in runs:
            ctx = run._context(layer, q, k, visible, scaling, kv_heads, module, value)
            ctx.provide(**shared)
            if run.policy.evicts:
                ctx.history.kept = run.policy.compress(ctx)  # (B, H, T)
            run.policy.remember(ctx)
            if ctx.computed("received_total"):
                shared["received_total"] = ctx.received_total

    def block_selection(self, ctx: ScoreContext, lists: bool | None = None, pairs=None):
        """A block policy's selection for a prefill, once per query block: from the
        block's first row (``causal``) or from all its queries (``prompt``,
        :meth:`~attnlab.policies.base.BlockPolicy.block_scores`), under the budget of its
        last row, among the key blocks some row of it sees (both edges of a window).
        ctx: every row of the prefill. Returns (B, H, Mq, Mk) bool kept blocks; with
        ``lists`` (True: under the model's own mask, False: causal) also the BlockMask's
        lists, from the fused kernel (:func:`attnlab.kernels.budget.budget_select`, the
        same selection), or None where the policy leaves the layer dense, and the kept
        pairs the kernel summed given the visible ``pairs`` per block pair (else None).
        With ``ctx.chosen_blocks`` the fused path chooses for the query blocks before it
        alone: those from it keep every key they see (a window's whole rows, which run
        apart), their rows of the keep-mask and lists are not written, their pairs counted
        as kept."""
        t, bs = ctx.q.shape[-2], self.policy.block_size
        b, h = ctx.q.shape[:2]
        starts = ctx.cached(("starts", t, bs), lambda: torch.arange(0, t, bs, device=ctx.q.device))
        ends = ctx.cached(("ends", t, bs), lambda: (starts + bs - 1).clamp(max=t - 1))

        def seen():  # (B, 1, Mq, Mk): once per mask where the mask's rows are cached
            if ctx.row_blocks is not None:
                return ctx.row_blocks(starts, ends, bs)
            return visible_per_block(ctx.visible_rows(starts) | ctx.visible_rows(ends), bs)

        count = ctx.cached(("seen", t, bs), seen)
        rows = starts if self.selection == "causal" else ends
        if fused := lists is not None:
            from attnlab.kernels.budget import MAX_BLOCKS, budget_select, row_bands

            fused = count.shape[-1] <= MAX_BLOCKS  # else a row too long for one program
        chosen = ctx.chosen_blocks if fused else None  # the query blocks that choose
        ctx.chosen_blocks = chosen  # as the policy's scores read it (none on the PyTorch path)
        if fused:  # a causal prefill's and a plain window's bands are made on the host,
            # others read; a policy's kernels may skip what lies before a block's band,
            # and every block of the rows that keep what they see (a band past the last)
            of_counts = ctx.block_bands or (lambda count, _: row_bands(count))
            bands = ctx.cached(("bands", t, bs), lambda: of_counts(count, bs))
            ctx.first_blocks = ctx.cached(
                ("firsts", t, bs, chosen), lambda: _firsts(bands[0].amin(0), chosen)
            )
        score = self.policy.block_scores(ctx, rows, self.selection)
        if score is None:  # a layer the policy leaves dense
            keep = (count > 0).expand(b, h, *count.shape[-2:])
        elif not fused:
            keep = keep_blocks_by_budget(score, count, ctx.budget[..., ends])
        else:
            count = ctx.cached(("seen, int32", t, bs), lambda: count.to(torch.int32))
            made = lambda: (ends, ctx.budget, ctx.budget[..., ends])  # noqa: E731
            budget = ctx.cached(("budgets of", id(ends), id(ctx.budget)), made)[2]
            out = budget_select(score, count, budget, lists, bands, pairs, chosen)
            if pairs is None:
                return (*out, None)
            if chosen is not None:  # the rows from there keep every pair they see
                whole = ctx.cached(("pairs from", t, bs, chosen), lambda: pairs[chosen:].sum())
                out = (*out[:2], out[2] + b * h * whole)
            return out
        return keep if lists is None else (keep, None, None)


def _firsts(first: torch.Tensor, chosen: int | None) -> torch.Tensor:
    """Each query block's first key block (Mq,) as a fused prefill's score kernels read
    it: from ``chosen`` on (the blocks that keep every key they see) past the last block,
    so that no tile of theirs alone is multiplied."""
    if chosen is None:
        return first
    first = first.clone()
    first[chosen:] = first.shape[-1]
    return first
