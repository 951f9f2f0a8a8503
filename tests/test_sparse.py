"""The sparse runner on the real models: full equals eager; decode equals prefill."""

import math

import pytest
import torch
from transformers import DynamicCache

from attnlab import attention, block_prefill, policies, sparse


def logits(model, ids, run=None):
    with torch.inference_mode():
        if run is None:
            return model(ids).logits
        with run:
            return model(ids).logits


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_full_policy_equals_model_sdpa_attention(fixture, request):
    """Full attention (and every call where a policy does not act) runs PyTorch's fused
    kernel under the model's own mask: the model's own SDPA attention, exactly."""
    model, _, _ = request.getfixturevalue(fixture)
    ids = torch.randint(200, 5000, (1, 96), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("sdpa")
    try:
        ref = logits(model, ids)
    finally:
        attention.install(model)
    run = sparse.SparseRun(policies.make("full"))
    out = logits(model, ids, run)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert run.recorder.achieved_sparsity == 0.0


@pytest.mark.parametrize("name", ["topk", "h2o", "streamingllm", "cab", "random_block"])
def test_decode_step_equals_prefill_of_whole_sequence(smollm2, name):
    """A decode step under a policy (``decode="policy"``) sees what the same row sees in a
    longer prefill, eviction memory included."""
    model, _, _ = smollm2
    ids = torch.randint(200, 5000, (1, 70), generator=torch.Generator().manual_seed(1))
    policy = policies.make(name, **({"block_size": 8} if name in ("cab", "random_block") else {}))
    ref = logits(model, ids, sparse.SparseRun(policy, 0.8))[0, -1]
    cache = DynamicCache()
    run = sparse.SparseRun(policy, 0.8, decode="policy")
    with torch.inference_mode(), run:
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, ref, rtol=0, atol=2e-4)


def test_sparse_run_reaches_its_target_and_changes_the_output(smollm2):
    model, _, info = smollm2
    ids = torch.randint(200, 5000, (1, 256), generator=torch.Generator().manual_seed(2))
    dense = logits(model, ids, sparse.SparseRun(policies.make("full")))
    run = sparse.SparseRun(policies.make("topk"), 0.9, watch=[10, 11])
    out = logits(model, ids, run)
    assert 0.895 <= run.recorder.achieved_sparsity <= 0.905
    assert len(run.recorder.watch_kept) == info.n_layers * info.n_heads
    assert not torch.allclose(out, dense, atol=1e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cab", "random_block"])
def test_flex_prefill_matches_masked_attention_with_the_same_mask(name, device):
    """The FlexAttention path equals a masked softmax over the selection it makes, and
    the keep-mask path (the CPU's kernel) makes the same selection, per query block."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 100, 16, generator=g).to(device) for h in (4, 2, 2))  # GQA
    module = SimpleNamespace(layer_idx=0, head_dim=16)
    policy = policies.make(name, block_size=16)
    run = sparse.SparseRun(policy, 0.7, backend="flex", watch=[5, 40])
    with run:
        out, _ = attention.attention_forward(module, q, k, v, None, scaling=0.25)
    keep = sparse.SparseRun(policy, 0.7).block_mask(0, q, k.repeat_interleave(2, 1), 0.25)
    visible = torch.ones(100, 100, dtype=torch.bool, device=device).tril()[None, None]
    tokens = keep.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :100, :100] & visible
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~tokens, float("-inf"))
    expected = (torch.softmax(scores, -1) @ vv).transpose(1, 2)
    tol = 1e-5 if device == "cpu" else 2e-3  # compiled flex on the GPU may use TF32
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert 0.5 < run.recorder.achieved_sparsity < 0.75
    # counted from the blocks, as the token-level mask counts them
    assert run.recorder.kept == int(tokens.sum()) and run.recorder.causal == 4 * 100 * 101 // 2
    assert run.recorder.watch_kept == tokens[0, :, -1][:, [5, 40]].any(-1).float().tolist()
    last = torch.softmax((q[..., -1:, :] @ kk.transpose(-1, -2))[..., 0, :] * 0.25, -1)
    recall = (last * tokens[..., -1, :]).sum(-1).mean()  # the last row's kept mass
    assert run.recorder.recall_by_layer()["recall"] == pytest.approx([float(recall)], abs=1e-5)
    raw = torch.where(visible, q @ kk.transpose(-1, -2) * 0.25, float("-inf"))
    rows = sparse.SparseRun(policy, 0.7, backend="eager").mask(0, q, kk, visible, 0.25, raw)
    assert torch.equal(rows, tokens.expand_as(rows))


def _chunked(model, ids, name, sparsity, row_chunk, watch=()):
    run = sparse.SparseRun(policies.make(name), sparsity, row_chunk=row_chunk, watch=watch)
    return logits(model, ids, run), run


@pytest.mark.parametrize("name", ["topk", "streamingllm"])
def test_row_chunks_choose_as_one_call_without_eviction_between_rows(gemma3, name):
    """A token-level policy whose rows never need the eviction memory within a call (the
    oracle; StreamingLLM's window, which never re-admits a key) chooses the same keys in
    row chunks as in one call: same logits, same kept pairs, same needle record. Gemma 3
    has sliding-window layers, whose mask the chunks slice."""
    model, _, _ = gemma3
    ids = torch.randint(200, 5000, (1, 150), generator=torch.Generator().manual_seed(4))
    ref, whole = _chunked(model, ids, name, 0.8, 0, watch=[20, 21])
    out, chunked = _chunked(model, ids, name, 0.8, 32, watch=[20, 21])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert (chunked.recorder.kept, chunked.recorder.causal, chunked.recorder.hidden) == (
        whole.recorder.kept,
        whole.recorder.causal,
        whole.recorder.hidden,
    )
    assert chunked.recorder.watch_kept == whole.recorder.watch_kept


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_one_row_chunks_equal_eviction_row_by_row(smollm2, name):
    """Chunks of one row drop keys after every row: the exact eviction memory of one call
    (H2O's received attention and SnapKV's observation window carried across calls)."""
    model, _, _ = smollm2
    ids = torch.randint(200, 5000, (1, 48), generator=torch.Generator().manual_seed(5))
    ref, whole = _chunked(model, ids, name, 0.7, 0)
    out, chunked = _chunked(model, ids, name, 0.7, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)
    assert chunked.recorder.kept == whole.recorder.kept


def test_chunked_eviction_drops_keys_between_chunks_only(smollm2):
    """With chunks of 16 rows, H2O's rows choose from their chunk's cache: each row keeps
    its budget (the target sparsity is reached), and the result differs from row-by-row
    eviction, which no row of a chunk can see."""
    model, _, _ = smollm2
    ids = torch.randint(200, 5000, (1, 96), generator=torch.Generator().manual_seed(6))
    ref, whole = _chunked(model, ids, "h2o", 0.7, 0)
    out, chunked = _chunked(model, ids, "h2o", 0.7, 16)
    assert abs(chunked.recorder.achieved_sparsity - whole.recorder.achieved_sparsity) < 0.01
    assert not torch.allclose(out, ref, atol=1e-3)


@pytest.mark.parametrize("window", [None, 20])
def test_visible_block_pairs_count_the_visible_pairs_of_each_block(window):
    from attnlab.blocks import causal_block_pairs, visible_block_pairs

    t, bs = 2100, 16  # past one row chunk (1024), a ragged last block
    tokens = torch.tril(torch.ones(t, t, dtype=torch.long))
    if window:
        tokens = tokens.triu(-(window - 1))  # row q sees keys q - 19 .. q
    m = -(-t // bs)
    pad = m * bs - t
    want = torch.nn.functional.pad(tokens, (0, pad, 0, pad)).view(m, bs, m, bs).sum((1, 3))
    assert torch.equal(visible_block_pairs(tokens.bool(), bs), want)
    if window is None:  # the causal prefill's count by formula
        assert torch.equal(causal_block_pairs(t, bs), want)


def test_attention_recall_of_a_planted_pattern():
    """The answering row's weights are planted: with one-hot keys and a query of ones,
    key j scores s_j, so its full-attention weight is softmax(s)_j. StreamingLLM at 80%
    keeps the 4 sinks and the most recent keys of a 40-key budget (with the row itself:
    positions 0-3 and 164-199); the oracle keeps the 40 largest weights. Recall, overlap
    and the oracle's mass follow from s alone."""
    from types import SimpleNamespace

    t, d = 200, 200
    g = torch.Generator().manual_seed(9)
    s = torch.randn(t, generator=g) * 2.0
    s[50:60] += 6.0  # a needle the window misses
    k = torch.diag(s)[None, None]  # (1, 1, T, D): key j = s_j e_j
    q = torch.ones(1, 1, t, d)
    module = SimpleNamespace(layer_idx=0, head_dim=d)
    run = sparse.SparseRun(policies.make("streamingllm"), 0.8, backend="eager")
    with run:
        attention.attention_forward(module, q, k, k, None, scaling=1.0)
    p = torch.softmax(s, 0)
    kept = torch.zeros(t, dtype=torch.bool)
    kept[:4] = kept[164:] = True
    oracle = p.topk(40).indices
    by = run.recorder.recall_by_layer()
    assert by["recall"] == pytest.approx([float(p[kept].sum())], abs=1e-5)
    assert by["overlap"] == pytest.approx([float(kept[oracle].float().mean())], abs=1e-6)
    assert by["oracle"] == pytest.approx([float(p.topk(40).values.sum())], abs=1e-5)
    assert by["recall"][0] < 0.5 < by["oracle"][0]  # the needle carries most of the mass
    # a sliding window narrower than the budget: the oracle keeps every visible key
    window = torch.zeros(1, 1, t, dtype=torch.bool)
    window[..., -16:] = True
    run.recorder.recall_sums.clear()
    budget = torch.tensor([[40]])
    run.recorder.record_recall(0, q[..., -1, :], k, window, 1.0, window, budget)
    by = run.recorder.recall_by_layer()
    assert by["overlap"] == [1.0]  # all 16 oracle keys kept (not 16 of a 40-key budget)
    assert by["recall"] == pytest.approx([1.0]) and by["oracle"] == pytest.approx([1.0])


def test_full_attention_in_sliding_window_layers_runs_flex_under_the_models_own_mask(gemma3):
    """With no policy acting, Gemma's sliding-window layers run FlexAttention under the
    model's own mask as a BlockMask (no (T, T) tensor; eager on the CPU here, compiled on
    CUDA) and give the logits of SDPA under the dense mask. 600 tokens: past the 512-token
    window (and not a multiple of the BlockMask's 128). The run counts the pairs the
    windows hide from the BlockMask, exactly. The two kernels sum in different orders:
    their float32 logits (magnitude ~100) differed by at most 1.5e-3 at 1100 tokens here;
    1e-2 allows 6x that."""
    model, _, _ = gemma3
    ids = torch.randint(300, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
    logits, kernels = {}, {}
    # the pairs the windows hide, counted with no dense mask: row q sees min(q + 1, w) keys
    cfg, t = model.config, ids.shape[1]
    per_head = sum(max(0, q + 1 - cfg.sliding_window) for q in range(t))
    hidden = per_head * cfg.num_attention_heads * 15  # Gemma's 15 sliding-window layers
    for kernel in ("sdpa", "flex"):
        run = sparse.SparseRun(policies.make("full"), 0.0)
        with torch.inference_mode(), attention.window_kernel(kernel), run:
            logits[kernel] = model(ids, use_cache=False).logits[0]
        kernels[kernel] = run.kernels
        assert run.recorder.hidden == hidden and run.recorder.kept == run.recorder.causal - hidden
    assert kernels["flex"] == {"flex model mask": 15, "sdpa causal": 3}
    assert kernels["sdpa"] == {"sdpa model mask": 15, "sdpa causal": 3}
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=0, atol=1e-2)
    with torch.inference_mode():  # no run at all: the same kernels, the same logits
        plain = model(ids, use_cache=False).logits[0]
    torch.testing.assert_close(plain, logits["sdpa"], rtol=0, atol=0)


def test_needle_recall_counts_the_retrieval_heads_alone():
    """Two heads of one answering row: head 0 puts most of full attention's weight on the
    needle (keys 50-52), head 1 almost none (below the 5% rule: not a retrieval head).
    A keep-mask holding key 50 and 51 of the needle in head 0 keeps their share of head
    0's needle weight, whatever head 1 keeps."""
    t = 100
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, t, generator=g)
    s[0, 50:53] += torch.tensor([6.0, 5.0, 4.0])  # head 0 attends to the needle
    s[1, 50:53] -= 8.0  # head 1 does not
    k = torch.diag_embed(s)[None]  # (1, 2, T, T): key j of head h = s[h, j] e_j
    q = torch.ones(1, 2, t)
    keep = torch.ones(1, 2, t, dtype=torch.bool)
    keep[0, 0, 52] = keep[0, 1, 50:53] = False
    run = sparse.SparseRun(policies.make("topk"), 0.5, watch=[50, 51, 52])
    visible = torch.ones(1, 1, t, dtype=torch.bool)
    run.recorder.record_recall(0, q, k, visible, 1.0, keep, torch.tensor([[50]]))
    p = torch.softmax(s, -1)
    assert p[1, 50:53].sum() < 0.05 < p[0, 50:53].sum()
    want = float(p[0, 50:52].sum() / p[0, 50:53].sum())
    assert run.recorder.needle_recall == pytest.approx(want, abs=1e-6)
    assert math.isnan(
        sparse.SparseRun(policies.make("full")).recorder.needle_recall
    )  # nothing kept


def test_a_global_layers_policy_leaves_the_window_layers_to_the_model():
    """Quest with ``window_layers`` False (``quest_global``) acts on the global layer
    alone: the two window layers run the model's own kernel and attend as under full
    attention (their outputs equal, bit for bit), the global layer runs Quest's mask, and
    the achieved sparsity counts the windows' pairs as kept."""
    from tests.tiny_models import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(300, 5000, (1, 200), generator=torch.Generator().manual_seed(4))
    out, runs = {}, {}
    for name, policy in (
        ("full", policies.make("full")),
        ("quest", policies.make("quest", block_size=16)),
        ("global", policies.make("quest", block_size=16, window_layers=False)),
    ):
        seen = []
        hooks = [
            layer.self_attn.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o[0]))
            for layer in model.model.layers
        ]
        runs[name] = sparse.SparseRun(policy, 0.8, whole_prompt=True)
        with torch.inference_mode(), runs[name]:
            model(ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        out[name] = seen
    assert runs["global"].kernels == {"sdpa model mask": 2, "sdpa keep-mask": 1}
    for layer in (0, 1):  # the window layers
        assert torch.equal(out["global"][layer], out["full"][layer])
        assert not torch.equal(out["quest"][layer], out["full"][layer])
    assert not torch.allclose(out["global"][2], out["full"][2], atol=1e-3)
    sparsity = {name: run.recorder.achieved_sparsity for name, run in runs.items()}
    assert sparsity["full"] < sparsity["global"] < sparsity["quest"]
    padding = torch.ones(2, 200, dtype=torch.long)
    padding[1, :5] = 0  # a padded batch: padding is not a window, the global layer acts
    run = sparse.SparseRun(runs["global"].policy, 0.8, whole_prompt=True)
    with torch.inference_mode(), run:
        model(ids.expand(2, -1), attention_mask=padding, use_cache=False)
    assert run.kernels == {"sdpa model mask": 2, "sdpa keep-mask": 1}


@pytest.mark.parametrize("name", ["quest", "random_block"])
def test_a_prefills_layers_build_what_their_mask_gives_once(name, monkeypatch):
    """Through FlexAttention, the layers of a causal prefill under one block policy read
    the rows' positions and budgets, the must-keep blocks and the pairs per block from
    the pass's store: built by the first layer, read by the others, the same selection
    as a run that builds them afresh for its one layer."""
    from attnlab.policies import selection

    built = {"budgets": 0, "must keep": 0, "pairs": 0}

    def counted(fn, what):
        return lambda *a, **kw: built.__setitem__(what, built[what] + 1) or fn(*a, **kw)

    monkeypatch.setattr(sparse, "row_budget", counted(sparse.row_budget, "budgets"))
    monkeypatch.setattr(selection, "block_of", counted(selection.block_of, "must keep"))
    monkeypatch.setattr(
        block_prefill, "causal_block_pairs", counted(block_prefill.causal_block_pairs, "pairs")
    )
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, 120, 16, generator=g) for h in (4, 1, 1))
    policy = policies.make(name, block_size=16)
    run = sparse.SparseRun(policy, 0.7, backend="flex", records=False)
    outs = [run.flex_attention(layer, q, k, v, 0.25) for layer in range(3)]
    assert built == {"budgets": 1, "must keep": 1, "pairs": 1}
    for layer in range(3):  # each layer alone, nothing shared
        alone = sparse.SparseRun(policy, 0.7, backend="flex", records=False)
        assert torch.equal(alone.flex_attention(layer, q, k, v, 0.25), outs[layer])
