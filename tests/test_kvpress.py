"""attnlab's cache-regime eviction policies against NVIDIA's kvpress (0.5.5) on SmolLM2.

kvpress runs through its own hooks on the model's prefill (with the few-line adapter its
hook needs under transformers 5), and its compressed cache is compared, key for key,
with the cache attnlab's policies keep; then greedy generation from both caches.
"""

import pytest
import torch
from transformers import DynamicCache

from attnlab import decoding, niah, policies, sparse
from attnlab.errors import UserError

kvpress = pytest.importorskip(
    "kvpress",
    reason="kvpress is installed by `make install` (pip install --no-deps kvpress==0.5.5)",
)

# kvpress's pipeline passes the cache as past_key_values=, which transformers 5.2x deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# (1 - 0.75) * 512 = 128 exactly, so attnlab's budget, max(1, round((1 - s) T)), and
# kvpress's count, max(1, int(T (1 - ratio))), agree.
T = 512
SPARSITY = 0.75
N_KEPT = 128
NEW_TOKENS = 8

PAIRS = {
    "snapkv": (
        lambda: kvpress.SnapKVPress(compression_ratio=SPARSITY, window_size=64, kernel_size=5),
        lambda: policies.make("snapkv", window=64, kernel=5, pooling="avgpool"),
    ),
    "streamingllm": (
        lambda: kvpress.StreamingLLMPress(compression_ratio=SPARSITY, n_sink=4),
        lambda: policies.make("streamingllm", n_sink=4),
    ),
}


def tf5_press(press):
    """Let a press's hook run under transformers 5.2x: kvpress 0.5.5 reads the hook's
    kwargs["past_key_values"] and kwargs["cache_position"], but the decoder layer now
    passes the cache as ``cache=`` and no cache position. The hook runs after the layer's
    cache update, so this layer's cache already holds the call's tokens."""
    hook = press.forward_hook

    def forward_hook(module, args, kwargs, output):
        kw = dict(kwargs)
        cache = kw.get("past_key_values")
        cache = kw.get("cache") if cache is None else cache
        q_len = kw["hidden_states"].shape[1]
        past = cache.layers[module.layer_idx].get_seq_length() - q_len
        kw["past_key_values"] = cache
        kw["cache_position"] = torch.arange(past, past + q_len)
        return hook(module, args, kw, output)

    object.__setattr__(press, "forward_hook", forward_hook)  # shadows the bound method
    return press


def kvpress_prefill(model, ids, press):
    """The prompt's prefill as kvpress's pipeline runs it: ``model.model`` inside the
    press. Returns the compressed cache, the last row's logits and each layer's attention
    inputs (hidden states, position embeddings) for re-scoring."""
    inputs = {}

    def keep(module, args, kwargs, output):
        inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    hooks = [
        layer.self_attn.register_forward_hook(keep, with_kwargs=True)
        for layer in model.model.layers
    ]
    cache = DynamicCache()
    try:
        with torch.inference_mode(), tf5_press(press)(model):
            hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
            logits = model.lm_head(hidden[:, -1])[0]
    finally:
        for h in hooks:
            h.remove()
    return cache, logits, inputs


def kvpress_decode(model, cache, logits, n_prompt, max_new_tokens):
    """Greedy decoding from a compressed cache as kvpress's pipeline does it: every new
    token is appended to the cache, at explicit positions continuing from the prompt's
    (the cache's own length is the compressed one)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = []
    with torch.inference_mode():
        for step in range(max_new_tokens):
            nxt = int(logits.argmax())
            if nxt in eos:
                break
            new.append(nxt)
            if step == max_new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[nxt]]),
                past_key_values=cache,
                position_ids=torch.tensor([[n_prompt + step]]),
                logits_to_keep=1,
            )
            logits = out.logits[0, -1]
    return new


def positions_in(full: torch.Tensor, kept: torch.Tensor) -> list[set[int]]:
    """Prompt positions of a compressed cache's keys, per key/value head: kept (Hkv, n, D)
    rows found in full (Hkv, T, D) by exact equality, each exactly once (kvpress stores
    them in top-k order, not by position)."""
    match = (kept[:, :, None, :] == full[:, None, :, :]).all(-1)  # (Hkv, n, T)
    assert (match.sum(-1) == 1).all(), "a compressed key is not one prompt key"
    return [set(row.tolist()) for row in match.float().argmax(-1)]


def assert_same_but_ties(ours: set, theirs: set, scores, where: str) -> None:
    """The two kept sets are equal, or differ only in keys whose score equals the score
    at the cut (the n-th largest): which of tied keys a top-k keeps is arbitrary.
    ``scores()`` computes the (T,) scores only when needed."""
    assert len(ours) == len(theirs) == N_KEPT, where
    diff = ours ^ theirs
    if diff:
        s = scores()
        cut = s.topk(N_KEPT).values[-1]
        off = {i: float(s[i]) for i in sorted(diff) if s[i] != cut}
        assert not off, f"{where}: keys kept by one side only score {off}, cut {float(cut)}"


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    _, tok, _ = smollm2
    return torch.tensor([niah.make_prompt(tok, T, 0.5, 0, seed=0).input_ids])


@pytest.fixture(scope="module")
def attnlab_prefill(smollm2, prompt_ids):
    """attnlab's cache-regime runs of SnapKV, StreamingLLM and ``kvpress:KnormPress``
    from one dense prefill of the prompt (as ``decoding.generate_shared`` shares it).
    Returns the cache (attnlab masks keys and drops none: the whole prompt), the last
    logits, the runs, and each run's kept sets right after compression."""
    model, _, _ = smollm2
    runs = {
        name: sparse.SparseRun(pair[1](), SPARSITY, regime="cache") for name, pair in PAIRS.items()
    }
    runs["knorm"] = sparse.SparseRun(policies.make("kvpress:KnormPress"), SPARSITY, regime="cache")
    leader = sparse.SparseRun(policies.make("full"), regime="cache", followers=list(runs.values()))
    cache, logits = decoding.prefill(model, prompt_ids, leader)
    kept = {
        name: {layer: h.kept.clone() for layer, h in run.histories.items()}
        for name, run in runs.items()
    }
    return cache, logits, runs, kept


@pytest.fixture(scope="module", params=list(PAIRS))
def kvpress_prefill_of(request, smollm2, prompt_ids):
    """kvpress's prefill of the prompt under one press: (name, press, compressed cache,
    last logits, each layer's attention inputs)."""
    model, _, _ = smollm2
    press = PAIRS[request.param][0]()
    return (request.param, press, *kvpress_prefill(model, prompt_ids, press))


def test_attnlab_eviction_keeps_the_keys_kvpress_keeps(
    smollm2, attnlab_prefill, kvpress_prefill_of
):
    """SnapKV and StreamingLLM compress the prompt's cache to the same keys as kvpress's
    SnapKVPress and StreamingLLMPress, per layer and key/value head (ties aside: where the
    sets differ, every differing key's kvpress score equals the score at the cut, exactly,
    computed by the press's own ``score`` on the layer's inputs and uncompressed keys)."""
    model, _, info = smollm2
    groups = info.n_heads // info.n_kv_heads
    name, press, kv_cache, _, inputs = kvpress_prefill_of
    full, _, _, kept_by = attnlab_prefill
    compared = 0
    for layer in range(info.n_layers):
        kept = kept_by[name][layer][0]  # (H, T) bool
        assert kept.shape[-1] == T
        keys = full.layers[layer].keys[:, :, :T]  # (1, Hkv, T, D)
        assert kv_cache.layers[layer].keys.shape[-2] == N_KEPT
        kv_kept = positions_in(keys[0], kv_cache.layers[layer].keys[0])
        for g in range(info.n_kv_heads):
            group = kept[g * groups : (g + 1) * groups]
            assert (group == group[0]).all(), f"layer {layer}: query heads of group {g} differ"
            ours = set(group[0].nonzero().flatten().tolist())

            def scores(layer=layer, g=g, keys=keys):
                hidden, pe = inputs[layer]
                module = model.model.layers[layer].self_attn
                values = full.layers[layer].values[:, :, :T]
                with torch.inference_mode():
                    s = press.score(module, hidden, keys, values, None, {"position_embeddings": pe})
                return s[0, g]

            assert_same_but_ties(ours, kv_kept[g], scores, f"{name} layer {layer} kv head {g}")
            compared += 1
    assert compared == info.n_layers * info.n_kv_heads


def _copy(cache) -> DynamicCache:
    """A cache with copies of another's keys and values (layer by layer)."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.clone(), layer.values.clone(), i)
    return out


def test_generation_after_compression_equals_kvpress(smollm2, attnlab_prefill, kvpress_prefill_of):
    """Greedy tokens decoded after compression are kvpress's, from the prefill's argmax on.
    (StreamingLLM keeps sliding during decoding, kvpress's press does not: an old key or
    so per token differs, which moves no token here.)"""
    model, tok, _ = smollm2
    name, _, kv_cache, kv_logits, _ = kvpress_prefill_of
    cache, logits, runs, _ = attnlab_prefill
    assert int(kv_logits.argmax()) == int(logits.argmax())  # both prefills are dense
    theirs = kvpress_decode(model, _copy(kv_cache), kv_logits, T, NEW_TOKENS)
    ours = decoding.decode(model, _copy(cache), logits, runs[name], NEW_TOKENS)
    assert len(ours) == NEW_TOKENS
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


def test_kvpress_knorm_policy_keeps_the_smallest_key_norms_and_every_new_key(
    smollm2, attnlab_prefill
):
    """``kvpress:KnormPress`` as an attnlab policy in the cache regime: each key/value
    head keeps the 128 prompt keys of smallest norm (KnormPress's score, -||k||, by hand
    from the cached keys), the same for every query head of its group, and nothing more
    is dropped while decoding, so the decode rows run at about the target sparsity."""
    model, _, info = smollm2
    groups = info.n_heads // info.n_kv_heads
    full, logits, runs, kept_by = attnlab_prefill
    run = runs["knorm"]
    for layer in range(info.n_layers):
        norm = -full.layers[layer].keys[0, :, :T].float().norm(dim=-1)  # (Hkv, T)
        for g in range(info.n_kv_heads):
            group = kept_by["knorm"][layer][0, g * groups : (g + 1) * groups]
            assert (group == group[0]).all()
            ours = set(group[0].nonzero().flatten().tolist())
            by_hand = set(norm[g].topk(N_KEPT).indices.tolist())
            assert_same_but_ties(ours, by_hand, lambda s=norm[g]: s, f"layer {layer} head {g}")
    new = decoding.decode(model, _copy(full), logits, run, NEW_TOKENS)
    assert len(new) == NEW_TOKENS
    n_rows = NEW_TOKENS - 1  # decode calls: the last token is not fed back
    for layer in range(info.n_layers):
        mask = run.histories[layer].kept[0]  # (H, T + n_rows): the cache after decoding
        assert torch.equal(mask[:, :T], kept_by["knorm"][layer][0])  # no prompt key dropped
        assert mask[:, T:].all()  # every generated key stays
    # row T + i keeps the 128 compressed keys and the i + 1 generated ones
    kept = sum(N_KEPT + i + 1 for i in range(n_rows))
    seen = sum(T + i + 1 for i in range(n_rows))
    assert run.recorder.achieved_sparsity == pytest.approx(1 - kept / seen)
    assert run.recorder.achieved_sparsity > 0.7


def test_kvpress_policy_refuses_the_prefill_regime(smollm2):
    model, _, _ = smollm2
    ids = torch.randint(200, 5000, (1, 16), generator=torch.Generator().manual_seed(0))
    run = sparse.SparseRun(policies.make("kvpress:KnormPress"), SPARSITY, regime="prefill")
    with pytest.raises(UserError, match="cache regime only"):
        decoding.prefill(model, ids, run)


@pytest.mark.parametrize(
    "name, message",
    [
        ("kvpress:NoSuchPress", "unknown kvpress press 'NoSuchPress'; e.g. KnormPress"),
        ("kvpress:ObservedAttentionPress", "ObservedAttentionPress needs the eager attention"),
        ("kvpress:AdaKVPress", "AdaKVPress does not score keys"),
        ("kvpress:PyramidKVPress", "PyramidKVPress sets its own budgets"),
        ("kvpress:QFilterPress", "QFilterPress needs the whole model"),
    ],
)
def test_make_refuses_presses_attnlab_cannot_run_in_one_line(name, message):
    with pytest.raises(UserError, match=message) as e:
        policies.make(name)
    assert "\n" not in str(e.value)


def test_make_builds_a_press_with_its_options():
    policy = policies.make("kvpress:SnapKVPress", options={"window_size": 32})
    assert policy.press == "SnapKVPress"
    assert policy._press.window_size == 32
    assert policy.params() == {  # a token-level policy has no block size
        "press": "SnapKVPress",
        "options": {"window_size": 32},
    }
    with pytest.raises(UserError, match="compression_ratio is set by the run"):
        policies.make("kvpress:SnapKVPress", options={"compression_ratio": 0.5})
    with pytest.raises(UserError, match="unexpected keyword argument 'windw_size'"):
        policies.make("kvpress:SnapKVPress", options={"windw_size": 32})


def test_kvpress_policy_scores_a_passkey_prompt_in_the_cache_regime(smollm2):
    """``niah.score_prompt`` runs a kvpress press like any cache-regime policy: the
    decode rows at about the target sparsity."""
    model, tok, _ = smollm2
    prompt = niah.make_prompt(tok, T, 0.5, 0, seed=0)
    policy = policies.make("kvpress:KnormPress")
    row = niah.score_prompt(model, tok, prompt, policy, SPARSITY, regime="cache")
    assert 0.7 < row["achieved_sparsity"] < SPARSITY
    assert row["generated"]


def test_press_ratio_makes_kvpress_count_the_attnlab_budget():
    """Presses whose score reads their compression ratio (StreamingLLMPress) get one
    under which kvpress's own count of kept keys is attnlab's budget, at any length."""
    from attnlab.policies.base import row_budget
    from attnlab.policies.kvpress_press import kept_count_ratio

    for n_keys in range(1, 1200):
        for s in (0.5, 0.75, 0.9, 0.97):
            n = int(row_budget(torch.tensor(n_keys), s))
            assert kvpress.utils.compute_n_kept(n_keys, kept_count_ratio(n, n_keys)) == n
