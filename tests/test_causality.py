"""Causality of every policy in both regimes: changing token p leaves every logit before
p unchanged (DESIGN: Causality). A property of the code, not of the weights: the tiny
random-weight Llama and Gemma 3 (tests/tiny_models.py, Gemma's windows of 24 keys) run
it in the fast tier."""

import copy
from dataclasses import dataclass, field

import pytest
import torch

from attnlab import decoding, policies, sparse

T, P = 112, 80  # sequence length; the changed position (prefill regime)
PROMPT, P_DECODE = 96, 104  # cache regime: the dense prompt, then a changed decode token
# Small blocks so that the block policies have several blocks (and a ragged last one).
PARAMS = {
    "cab": {"block_size": 16},
    "coarse_magnitude": {"block_size": 16},
    "random_block": {"block_size": 16},
    "quest": {"block_size": 16},
    "xattention": {"block_size": 32, "stride": 8},
    "snapkv": {"window": 8},
}
# CAB's ablation variants (workflow_config.yaml's policies.cab_*), causal in each regime too
VARIANTS = {
    "cab_plan": {"adjacency": "dot", "graph": "rowsum"},
    "cab_directed": {"graph": "directed"},
    "cab_query": {"query": "row"},
    "cab_quest_blend": {"magnitude": "quest", "lam": 0.5},
    "cab_sparq_blend": {"magnitude": "sparq", "lam": 0.5},
}
NAMES = sorted(policies.REGISTRY) + sorted(VARIANTS)
ATOL = 1e-5


# Twilight's top-p on two selectors (cache regime only: the prefill regime refuses it)
TWILIGHT = {"sparq_twilight": ("sparq", 0.9), "quest_twilight": ("quest", 0.9)}


def _policy(name):
    if name in VARIANTS:
        return policies.make("cab", **PARAMS["cab"], **VARIANTS[name])
    if name in TWILIGHT:
        base, top_p = TWILIGHT[name]
        return policies.make(base, **PARAMS.get(base, {}), top_p=top_p)
    return policies.make(name, **PARAMS.get(name, {}))


def _ids(p=P):
    ids = torch.randint(200, 5000, (1, T), generator=torch.Generator().manual_seed(7))
    other = ids.clone()
    other[0, p] = (ids[0, p] + 17) % 5000 + 200
    return ids, other


def _prefill_logits(model, ids, name, backend="eager"):
    run = sparse.SparseRun(_policy(name), 0.75, backend=backend)
    with torch.inference_mode(), run:
        return model(ids, use_cache=False).logits[0]  # (T, V)


@dataclass
class KeptRun(sparse.SparseRun):
    """A run that keeps each masked call's keep-mask: (layer, (B, H, Tq, Tk) bool)."""

    masks: list = field(default_factory=list)

    def mask(self, layer, q, k, visible, *args, **kwargs):
        keep = super().mask(layer, q, k, visible, *args, **kwargs)
        self.masks.append((layer, keep.expand(*q.shape[:3], k.shape[2]).clone()))
        return keep

    def kept_keys(self, tk: int) -> torch.Tensor:
        """Every decode row's kept keys, per layer: (layers, B, H, rows, tk) bool, a
        token-by-token run's rows (one call each) stacked like a multi-row run's."""
        by_layer: dict[int, list] = {}
        for layer, keep in self.masks:
            pad = torch.zeros(*keep.shape[:3], tk - keep.shape[3], dtype=torch.bool)
            by_layer.setdefault(layer, []).append(torch.cat([keep, pad], dim=-1))
        return torch.stack([torch.cat(by_layer[layer], dim=2) for layer in sorted(by_layer)])


def _cache_logits(model, ids, name, prompt=PROMPT):
    """A dense prefill of ``prompt`` tokens, then the rest teacher-forced one token at a
    time under the policy (the cache regime): logits of every decode row."""
    run = KeptRun(_policy(name), 0.75, regime="cache")
    cache, _ = decoding.prefill(model, ids[:, :prompt], run)
    rows = []
    with torch.inference_mode(), run:
        for t in range(prompt, T):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows), run  # (T - prompt, V)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_regime_rows_before_a_changed_token_keep_their_logits(tiny_llama, name):
    model = tiny_llama
    ids, other = _ids()
    a, b = _prefill_logits(model, ids, name), _prefill_logits(model, other, name)
    torch.testing.assert_close(a[:P], b[:P], rtol=0, atol=ATOL)
    if name != "full":  # the change is seen from p on: the test can fail
        assert not torch.allclose(a[P:], b[P:], atol=1e-3)


def _continuation_logits(model, ids, name, prompt=PROMPT):
    """The same dense prefill, then the rest in one teacher-forced pass under the policy
    (the cache regime's perplexity): logits of every row after the prompt."""
    run = KeptRun(_policy(name), 0.75, regime="cache")
    cache, _ = decoding.prefill(model, ids[:, :prompt], run)
    with torch.inference_mode(), run:
        out = model(ids[:, prompt:], past_key_values=cache, use_cache=True)
    return out.logits[0], run


@pytest.mark.parametrize("name", NAMES)
def test_cache_regime_rows_before_a_changed_token_keep_their_logits(tiny_llama, name):
    model = tiny_llama
    ids, other = _ids(P_DECODE)
    (a, run), (b, _) = _cache_logits(model, ids, name), _cache_logits(model, other, name)
    n = P_DECODE - PROMPT  # decode rows before the changed token
    torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=ATOL)
    assert not torch.allclose(a[n:], b[n:], atol=1e-3)
    if name != "full":
        assert run.recorder.achieved_sparsity > 0.5  # the policy acted on the decode rows
    _, multi = _continuation_logits(model, ids, name)
    # the budgets are per row: the same count of kept pairs whichever keys near ties keep
    assert multi.recorder.achieved_sparsity == pytest.approx(
        run.recorder.achieved_sparsity, abs=1e-12
    )


@pytest.mark.parametrize("name", sorted(TWILIGHT))
def test_top_p_pruning_keeps_rows_before_a_changed_token(tiny_llama, name):
    """Pruning to top_p reads only a row's own scores over the keys it sees."""
    ids, other = _ids(P_DECODE)
    (a, run), (b, _) = _cache_logits(tiny_llama, ids, name), _cache_logits(tiny_llama, other, name)
    n = P_DECODE - PROMPT
    torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=ATOL)
    assert not torch.allclose(a[n:], b[n:], atol=1e-3)
    _, plain = _cache_logits(tiny_llama, ids, TWILIGHT[name][0])  # the same, top_p 0
    # pruned within the budget
    assert run.recorder.achieved_sparsity > plain.recorder.achieved_sparsity


@pytest.fixture(scope="module")
def llama_f64(tiny_llama):
    """The tiny Llama in float64: the batched and single-row kernels then differ by ~1e-16,
    not float32's ~1e-7, so no selection's near tie turns on which kernel ran."""
    return copy.deepcopy(tiny_llama).to(torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_cache_regime_multi_row_pass_is_token_by_token_decoding(llama_f64, name):
    """One teacher-forced pass over the cache chooses exactly the keys token-by-token
    decoding chooses and gives its logits: what the cache regime's perplexity rests on.
    In float32 the two paths' scores differ by the batched kernels' rounding, which on
    some CPUs flips a near tie of the top-k (a different key kept, logits 1e-2 apart); in
    float64 the kept key sets are compared exactly and the logits to 1e-8 (float64
    rounding is ~1e-15 of the logits)."""
    ids, _ = _ids(P_DECODE)
    a, single = _cache_logits(llama_f64, ids, name)
    c, multi = _continuation_logits(llama_f64, ids, name)
    if name != "full":
        assert torch.equal(multi.kept_keys(T), single.kept_keys(T))
    torch.testing.assert_close(c, a, rtol=0, atol=1e-8)


BLOCK = [n for n, cls in sorted(policies.REGISTRY.items()) if cls.level == "block"]


@pytest.mark.parametrize("name", BLOCK)
def test_flex_prefill_rows_before_a_changed_token_keep_their_outputs(tiny_llama, name):
    """The FlexAttention path (query-block selections) is causal too."""
    model = tiny_llama
    ids, other = _ids()
    a = _prefill_logits(model, ids, name, backend="flex")
    b = _prefill_logits(model, other, name, backend="flex")
    torch.testing.assert_close(a[:P], b[:P], rtol=0, atol=ATOL)


GEMMA_T, GEMMA_P = 112, 80  # past the tiny Gemma's 24-key window; the changed position


@pytest.mark.parametrize("name", ["cab", "quest", "xattention"])
def test_flex_prefill_in_sliding_window_layers_is_causal(tiny_gemma3, name):
    """Gemma's sliding-window layers under a block policy's FlexAttention path (the model's
    window applied pair by pair over the kept blocks) are causal too."""
    model = tiny_gemma3
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(300, 5000, (1, GEMMA_T), generator=g)
    other = ids.clone()
    other[0, GEMMA_P] += 1
    out = []
    for x in (ids, other):
        run = sparse.SparseRun(_policy(name), 0.9, backend="flex")
        with torch.inference_mode(), run:
            out.append(model(x, use_cache=False).logits[0])
    assert run.kernels == {"flex block-sparse, model mask": 2, "flex block-sparse": 1}
    torch.testing.assert_close(out[0][:GEMMA_P], out[1][:GEMMA_P], rtol=0, atol=ATOL)
    assert not torch.allclose(out[0][GEMMA_P:], out[1][GEMMA_P:], atol=1e-3)


def test_flex_prefill_keeping_every_block_is_full_attention_under_the_window(tiny_gemma3):
    """At sparsity 0 a block policy keeps every block its rows see: the FlexAttention path
    with Gemma's window applied pair by pair gives full attention's logits (float32 noise
    of two kernels, 1e-4 allowed at logits of ~1) and counts exactly the pairs the windows
    hide (row q sees min(q + 1, window) keys)."""
    model = tiny_gemma3
    ids = torch.randint(300, 5000, (1, GEMMA_T), generator=torch.Generator().manual_seed(8))
    run = sparse.SparseRun(_policy("cab"), 0.0, backend="flex")
    with torch.inference_mode(), run:
        got = model(ids, use_cache=False).logits[0]
    with torch.inference_mode():
        want = model(ids, use_cache=False).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    cfg = model.config
    per_head = sum(max(0, q + 1 - cfg.sliding_window) for q in range(GEMMA_T))
    assert run.recorder.hidden == per_head * cfg.num_attention_heads * 2  # two window layers
    assert run.recorder.kept == run.recorder.causal - run.recorder.hidden


@pytest.mark.parametrize("name", BLOCK)
def test_flex_prefill_selects_as_the_keep_mask_path_under_the_window(tiny_gemma3, name):
    """The FlexAttention path reads the model's mask a set of rows at a time and keeps
    what it read for the next layer of the same mask (Gemma's two window layers share
    one); it keeps exactly the pairs the keep-mask path keeps (the CPU's kernel, which
    builds the whole mask in every layer), and the logits agree to float32 noise of two
    kernels (1e-4 at logits of ~1)."""
    model = tiny_gemma3
    ids = torch.randint(300, 5000, (1, GEMMA_T), generator=torch.Generator().manual_seed(9))
    runs, out = {}, {}
    for backend in ("flex", "eager"):
        runs[backend] = sparse.SparseRun(_policy(name), 0.8, backend=backend, whole_prompt=True)
        with torch.inference_mode(), runs[backend]:
            out[backend] = model(ids, use_cache=False).logits[0]
    assert runs["flex"].kernels == {"flex block-sparse, model mask": 2, "flex block-sparse": 1}
    assert int(runs["flex"].recorder.kept) == int(runs["eager"].recorder.kept) > 0
    assert runs["flex"].recorder.causal == runs["eager"].recorder.causal
    torch.testing.assert_close(out["flex"], out["eager"], rtol=0, atol=1e-4)
