"""What every sparse-attention policy shares: the scoring context, selection, accounting.

A policy only ranks keys. Token-level policies return a score per (query row, key);
block-level policies a score per (query row, key block). Must-keep entries score +inf.
:func:`keep_mask` turns scores into a keep-mask under the per-row budget
(:mod:`attnlab.policies.selection`), so no policy re-implements selection: a row at
position p has p + 1 causal keys and keeps at most ``budget(p + 1) = max(1, round((1 -
s)(p + 1)))`` of them, plus whatever its policy marks must-keep. Eviction policies
(``evicts``) select with memory: a key a row dropped is never seen again by a later row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, ClassVar, Literal

import torch

from attnlab.blocks import visible_per_block
from attnlab.errors import UserError
from attnlab.policies.fields import Range
from attnlab.policies.selection import (
    INF,
    alive_keys,
    keep_block_tokens_by_budget,
    prune_top_p,
    select_evicting,
    select_tokens,
    twilight,
)


def row_budget(n_visible: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keys a row may keep: max(1, round((1 - sparsity) * n_visible)); n_visible (..., Tq)."""
    return torch.clamp(torch.round((1.0 - sparsity) * n_visible.float()), min=1).long()


@dataclass
class LayerHistory:
    """What one layer remembers between calls (prefill, then each decode step)."""

    q: torch.Tensor | None = None  # (B, H, Tp, D) earlier query rows
    received: torch.Tensor | None = None  # (B, H, Tp) attention each key received so far
    kept: torch.Tensor | None = None  # (B, H, Tp) bool: keys still in an evicting cache
    # what a policy's ``remember`` keeps beyond these, one typed field per use:
    axes: torch.Tensor | None = None  # (B, H, D, D) Loki's principal axes of the keys
    window_probs: torch.Tensor | None = None  # (B, H, w - 1, Tp) SnapKV's last rows' weights
    compressed: bool = False  # SnapKV: the cache is compressed (once)


@dataclass
class ScoreContext:
    """Everything a policy may use to score keys for a batch of query rows.

    q: (B, H, Tq, D) query rows after RoPE; k: (B, H, Tk, D) keys expanded to the query
    heads; visible: (B, 1 or H, Tq, Tk) bool, what the model's own mask lets each row see
    (causality, sliding windows); q_pos: (Tq,) absolute positions; budget: (B, 1 or H, Tq)
    keys each row may keep; scaling: the model's softmax scale; layer: layer index;
    kv_heads: the model's key/value heads (k's heads are their grouped-query expansion);
    module, value, inputs: the attention module, its values (B, Hkv, Tk, D) and the
    keyword inputs of its forward call (hidden states, position embeddings), for policies
    that recompute from the model's own weights (kvpress presses); None elsewhere.

    ``scores`` and ``probs`` hold every row at once (B, H, Tq, Tk): the masked attention
    path has them anyway. A dense prefill does not, so what a policy reads of a long
    prompt there is computed in row chunks (``received_total``, ``window_probs``).
    """

    q: torch.Tensor
    k: torch.Tensor
    visible: torch.Tensor | None  # None: only ``row_mask`` (rows one set at a time)
    q_pos: torch.Tensor
    budget: torch.Tensor
    scaling: float
    layer: int
    seed: int = 0
    history: LayerHistory = field(default_factory=LayerHistory)
    kv_heads: int | None = None
    module: object = None
    value: torch.Tensor | None = None
    inputs: dict | None = None
    row_eviction: bool = True  # False: an evicting cache drops keys only between calls
    # the visible keys of some rows, (R,) -> (B, 1, R, Tk) bool, where the prefill reads
    # the mask a set of rows at a time (a block policy's FlexAttention path): visible_rows
    row_mask: Callable[[torch.Tensor], torch.Tensor] | None = None
    # there, the keys per key block that either of two rows of each query block sees,
    # (starts, ends, block_size) -> (B, 1, R, Mk) long, counted without those rows
    row_blocks: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    # and the budget kernel's bands of those counts, (count, block_size) -> (first, launches)
    block_bands: Callable[[torch.Tensor, int], tuple] | None = None
    # what is read from the model's mask, kept for the next layers under the same mask (a
    # block policy's prefill through FlexAttention: one forward pass and layer type)
    mask_cache: dict | None = None
    triton: bool = False  # a block policy may score with its Triton kernels (fused prefill)
    # there, the first key block each query block sees (Mq,): before it a kernel may skip
    first_blocks: torch.Tensor | None = None
    # and the query blocks that choose: those from this one on keep every key they see (a
    # window's whole rows, run apart), their scores never read; None: every block chooses
    chosen_blocks: int | None = None

    def provide(self, **values: torch.Tensor) -> None:
        """Hand over cached properties computed elsewhere (the attention's own ``scores``,
        a shared prefill's ``probs``), so reading them costs nothing."""
        self.__dict__.update(values)

    def computed(self, name: str) -> bool:
        """Whether the cached property ``name`` is already at hand."""
        return name in self.__dict__

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.q.shape[1] // (self.kv_heads or self.q.shape[1])

    @cached_property
    def scores(self) -> torch.Tensor:
        """Scaled dot products, -inf where not visible: (B, H, Tq, Tk) float32."""
        s = torch.einsum("bhqd,bhkd->bhqk", self.q.float(), self.k.float()) * self.scaling
        return torch.where(self.visible, s, -INF)

    @cached_property
    def probs(self) -> torch.Tensor:
        """Full-attention weights of the rows: (B, H, Tq, Tk)."""
        return torch.softmax(self.scores, dim=-1)

    @cached_property
    def received(self) -> torch.Tensor:
        """Attention each key has received from every query up to each row, inclusive.

        (B, H, Tq, Tk): the history's running total plus a cumulative sum over the rows.
        """
        probs = self.probs
        acc = torch.empty_like(probs)
        total = torch.zeros(probs.shape[:-2] + probs.shape[-1:], device=probs.device)
        prev = self.history.received
        if prev is not None:
            total[..., : prev.shape[-1]] = prev
        for i in range(0, probs.shape[-2], 64):  # row chunks: a strided cumsum is slow on CPU
            chunk = probs[..., i : i + 64, :].cumsum(dim=-2) + total.unsqueeze(-2)
            acc[..., i : i + 64, :] = chunk
            total = chunk[..., -1, :]
        return acc

    def row_probs(self, start: int, stop: int, keys: int | None = None) -> torch.Tensor:
        """Full-attention weights of rows start .. stop - 1 over the first ``keys`` keys
        (all by default; a row's weights beyond its own position are 0, so the keys up to
        the last row's position hold them all): (B, H, stop - start, keys)."""
        keys = self.k.shape[-2] if keys is None else keys
        if self.computed("probs"):
            return self.probs[..., start:stop, :keys]
        q, k = self.q[..., start:stop, :].float(), self.k[..., :keys, :].float()
        s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        s = torch.where(self.visible[..., start:stop, :keys], s * self.scaling, -INF)
        return torch.softmax(s, dim=-1)

    def window_probs(self, w: int) -> torch.Tensor:
        """Full-attention weights of the last ``w`` rows: (B, H, w, Tk)."""
        tq = self.q.shape[-2]
        return self.row_probs(tq - w, tq)

    @cached_property
    def received_total(self) -> torch.Tensor:
        """Attention each key has received up to the last row, inclusive: (B, H, Tk)."""
        tq, tk = self.q.shape[-2], self.k.shape[-2]
        total = self.q.new_zeros(self.q.shape[:2] + (tk,), dtype=torch.float32)
        for i in range(0, tq, 256):  # row chunks, each over the keys its rows can see
            stop = min(i + 256, tq)
            keys = min(tk, int(self.q_pos[stop - 1]) + 1)
            total[..., :keys] += self.row_probs(i, stop, keys).sum(-2)
        prev = self.history.received
        if prev is not None:
            total[..., : prev.shape[-1]] += prev
        return total

    @cached_property
    def q_all(self) -> torch.Tensor:
        """Every query row so far, earlier ones first: (B, H, Tp + Tq, D)."""
        prev = self.history.q
        return self.q if prev is None else torch.cat([prev, self.q], dim=-2)

    @property
    def key_pos(self) -> torch.Tensor:
        return torch.arange(self.k.shape[-2], device=self.k.device)

    def cached(self, key, make: Callable[[], torch.Tensor]):
        """``make()``, kept in ``mask_cache`` under ``key`` where there is one (a key that
        holds a tensor's ``id`` keeps that tensor in its value, so the id is not reused)."""
        if self.mask_cache is None:
            return make()
        if key not in self.mask_cache:
            self.mask_cache[key] = make()
        return self.mask_cache[key]

    def visible_rows(self, index: torch.Tensor) -> torch.Tensor:
        """What the model's own mask lets the rows ``index`` (R,) see: (B, 1 or H, R, Tk)
        bool, from ``visible`` or, where none was built, from ``row_mask`` (once per
        ``index`` tensor and mask)."""
        if self.visible is None:
            return self.cached(("rows", id(index)), lambda: (index, self.row_mask(index)))[1]
        return self.visible[..., index, :]

    def blocks_seen(self, block_size: int) -> torch.Tensor:
        """Visible keys of each row per key block of ``block_size`` keys: (B, 1 or H, Tq,
        Mk) long (once per mask where rows are cached)."""
        make = lambda: (self.visible, visible_per_block(self.visible, block_size))  # noqa: E731
        return self.cached(("blocks", id(self.visible), block_size), make)[1]

    def rows(self, index: torch.Tensor, received: bool = False) -> ScoreContext:
        """The context of the rows ``index`` (Tq,) alone, sharing this one's history and
        every query so far: what a policy sees when it chooses once for a query block
        (from one of its rows) or compresses a cache at the end of a prompt (the last
        row). ``received``: carry the attention every key received over all rows (a pass
        over them all), as of the last row."""
        make = lambda: (index, self.budget, self.q_pos[index], self.budget[..., index])  # noqa: E731
        q_pos, budget = self.cached(("of rows", id(index), id(self.budget)), make)[2:]
        sub = ScoreContext(
            module=self.module,
            value=self.value,
            inputs=self.inputs,
            q=self.q[..., index, :],
            k=self.k,
            visible=self.visible_rows(index),
            q_pos=q_pos,
            budget=budget,
            scaling=self.scaling,
            layer=self.layer,
            seed=self.seed,
            history=self.history,
            kv_heads=self.kv_heads,
            mask_cache=self.mask_cache,
            triton=self.triton,
        )
        if self.computed("scores"):
            sub.provide(scores=self.scores[..., index, :])
        sub.provide(q_all=self.q_all)
        if received:
            sub.provide(received=self.received_total.unsqueeze(-2))
        return sub

    def last_row(self, received: bool = False) -> ScoreContext:
        """:meth:`rows` of the last row alone."""
        return self.rows(torch.tensor([self.q.shape[-2] - 1], device=self.q.device), received)


@dataclass
class Policy:
    """Base of all policies. Subclasses set ``name``, ``level`` and implement ``score``."""

    name: ClassVar[str] = "base"
    level: ClassVar[str] = "token"  # "token" or "block"
    needs_received: ClassVar[bool] = False  # keep a running total of received attention
    needs_query_history: ClassVar[bool] = False  # keep earlier query rows
    evicts: ClassVar[bool] = False  # a key dropped once is never seen again (KV eviction)
    needs_inputs: ClassVar[bool] = False  # reads the attention module's inputs (ctx.inputs)
    # an evicting policy whose per-row choice already never re-admits a key (a sliding
    # window): its prefill rows need no sequential pass
    static_eviction: ClassVar[bool] = False
    label: ClassVar[str] = ""  # the policy's name in figures
    # the method has no prefill form of its own (it selects per generated token or evicts
    # from a cache): its prefill-regime rows are this project's extension, marked so
    prefill_extension: ClassVar[bool] = False

    def score(self, ctx: ScoreContext) -> torch.Tensor | None:
        """(B, H, Tq, Tk) token scores, (B, H, Tq, Mk) block scores, or None to keep all."""
        raise NotImplementedError

    def compress(self, ctx: ScoreContext) -> torch.Tensor:
        """Keys an evicting cache holds at the end of a prompt whose rows ``ctx`` covers
        (the ``cache`` regime, after the model's dense prefill): (B, H, Tk) bool. By
        default the last row's selection under its budget."""
        return keep_mask(self, ctx.last_row(self.needs_received))[..., 0, :]

    def remember(self, ctx: ScoreContext) -> None:
        """The one hook for state between calls, run after each call of a layer (and after
        :meth:`compress`): keep in ``ctx.history`` what this layer's later calls need. By
        default the earlier query rows (``needs_query_history``) and the attention each
        key has received (``needs_received``); a policy with more to keep extends it into
        its own field of :class:`LayerHistory`."""
        if self.needs_query_history:
            ctx.history.q = ctx.q_all
        if self.needs_received:
            ctx.history.received = ctx.received_total  # (B, H, Tk) totals so far

    def read_cost(self, head_dim: int, sparsity: float) -> float:
        """Share of the keys' bytes the policy reads per row to choose its keys at target
        ``sparsity`` (DESIGN: read cost), recorded beside accuracy; NaN where a policy does
        not state it."""
        return float("nan")

    def params(self) -> dict:
        """Hyper-parameters as plain values, for result tables."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class Selector(Policy):
    """Chooses each row's keys from the whole cache: takes Twilight's ``top_p``."""

    prunes_itself: ClassVar[bool] = False  # applies top_p in its own score (two-stage)
    top_p: Annotated[float, Range(0, 1)] = 0.0
    """Twilight's budget mode (cache regime): of the keys the budget keeps for a generated
    token, the fewest whose share of their attention reaches top_p (0: all of them)."""


@dataclass
class BlockPolicy(Selector):
    """A policy that ranks key blocks; ``selection.with_must_keep_blocks`` reads its two
    flags.

    In the prefill regime a block policy chooses once per query block (the granularity a
    block-sparse kernel runs), in one of two forms (DESIGN: Selection form): ``causal``,
    the block's first row chooses, from tokens at or before every row of the block; or
    ``prompt``, the block chooses from all of its queries (:meth:`block_scores`), which a
    later row of the block reaches: the form of methods that select over a prompt given
    whole (retrieval), wrong where a row predicts the next token of the same text.
    """

    level: ClassVar[str] = "block"
    paper_selection: ClassVar[str] = "causal"  # the method's own form, for a whole prompt
    block_size: Annotated[int, Range(1)] = 16
    """Tokens per block."""
    keep_diagonal: bool = True
    """Always keep the query's own block."""
    sink_block: bool = True
    """Always keep the first block."""
    selection: Literal["paper", "causal", "prompt"] = "paper"
    """Prefill regime: each query block's keys chosen by its first row ("causal") or from
    all its queries ("prompt"); "paper": the method's own form where a prompt is given
    whole (NIAH), "causal" where rows predict their text's next token (perplexity)."""

    def keeps_what_fits(self) -> bool:
        """Whether a query block whose visible keys all fit its budget keeps every block it
        sees (no visible block scored -inf): a sliding-window layer's rows past the
        budget's reach then run as the model's own mask (``windows.whole_rows``)."""
        return True

    def block_scores(self, ctx: ScoreContext, rows: torch.Tensor, form: str) -> torch.Tensor | None:
        """Key-block scores of each query block of a prefill in selection ``form``, from
        the row of that block in ``rows`` (Mq,): its first (``causal``) or its last
        (``prompt``: a row that has every query of its block before it) -> (B, H, Mq, Mk)
        or None (keep every block). A policy whose method scores a block otherwise in the
        prompt form (CAB's whole graph) overrides this."""
        sub = ctx.rows(rows)
        sub.first_blocks = ctx.first_blocks  # one row per query block: where its band starts
        return self.score(sub)


def selection_form(policy: Policy, whole_prompt: bool) -> str:
    """The selection form a run of ``policy`` takes: ``causal`` or ``prompt`` (block
    policies only, see :class:`BlockPolicy`). ``whole_prompt``: the prompt is given whole
    and answered after it (NIAH's prefill regime); otherwise (perplexity, teacher-forced
    rows) ``prompt`` would let a later token reach its own prediction and is refused."""
    asked = getattr(policy, "selection", "causal")
    form = policy.paper_selection if asked == "paper" else asked
    if form == "prompt" and not whole_prompt:
        if asked == "prompt":
            raise UserError(
                f"{policy.name}: selection 'prompt' chooses a query block's keys with its"
                " later rows, which teacher-forced rows (perplexity) must not see; use"
                " 'causal'"
            )
        return "causal"
    return form


def keep_mask(policy: Policy, ctx: ScoreContext) -> torch.Tensor:
    """The policy's keep-mask for the context's rows: (B, H, Tq, Tk) bool.

    An evicting policy's rows choose among the keys its cache still holds. Within the
    call, a key one row drops is gone for the rows after it (:func:`select_evicting`),
    unless the policy's own choice never re-admits a key (``static_eviction``) or the
    context drops keys only between calls (``row_eviction`` False: the rows of a
    chunked prefill share their chunk's cache).
    """
    score = policy.score(ctx)
    if score is None:
        return ctx.visible.expand(*ctx.q.shape[:2], *ctx.visible.shape[-2:])
    if policy.level == "block":
        keep = keep_block_tokens_by_budget(score, ctx.visible, ctx.budget, policy.block_size)
    elif policy.evicts:
        return _evicting_keep(policy, score, ctx)
    else:
        keep = select_tokens(score, ctx.visible, ctx.budget)
    if twilight(policy):  # Twilight's mode on the budget's keys
        keep = prune_top_p(keep, ctx.scores, policy.top_p)
    return keep


def _evicting_keep(policy: Policy, score: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """:func:`keep_mask` of an evicting policy."""
    kept = ctx.history.kept
    if kept is None and (policy.static_eviction or not ctx.row_eviction):
        return select_tokens(score, ctx.visible, ctx.budget)
    if policy.static_eviction or not ctx.row_eviction:
        return select_tokens(score, ctx.visible & alive_keys(kept, score.shape[-1]), ctx.budget)
    return select_evicting(score, ctx.visible, ctx.budget, kept)
