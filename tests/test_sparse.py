"""The sparse runner on the real models: full equals eager; decode equals prefill."""

import pytest
import torch
from transformers import DynamicCache

from attnlab import policies, sparse


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
        sparse.install(model)
    run = sparse.SparseRun(policies.make("full"))
    out = logits(model, ids, run)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert run.achieved_sparsity == 0.0


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
    assert 0.895 <= run.achieved_sparsity <= 0.905
    assert len(run.watch_kept) == info.n_layers * info.n_heads
    assert not torch.allclose(out, dense, atol=1e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cab", "random_block"])
def test_flex_prefill_matches_masked_attention_with_the_same_mask(name, device):
    """The FlexAttention path equals a masked softmax over the selection it makes, and
    that selection is made per query block: with scores shared by a block's rows (random
    blocks), it is the masked path's choice for the block's last row (whose budget it
    uses); CAB scores each row, and a block takes its first row's scores."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 100, 16, generator=g).to(device) for h in (4, 2, 2))  # GQA
    module = SimpleNamespace(layer_idx=0, head_dim=16)
    policy = policies.make(name, block_size=16)
    run = sparse.SparseRun(policy, 0.7, backend="flex")
    with run:
        out, _ = sparse.attention_forward(module, q, k, v, None, scaling=0.25)
    keep, visible = sparse.SparseRun(policy, 0.7).block_mask(0, q, k.repeat_interleave(2, 1), 0.25)
    tokens = keep.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :100, :100] & visible
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(~tokens, float("-inf"))
    expected = (torch.softmax(scores, -1) @ vv).transpose(1, 2)
    tol = 1e-5 if device == "cpu" else 2e-3  # compiled flex on the GPU may use TF32
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert 0.5 < run.achieved_sparsity < 0.75
    raw = torch.where(visible, q @ kk.transpose(-1, -2) * 0.25, float("-inf"))
    rows = sparse.SparseRun(policy, 0.7).mask(0, q, kk, visible, 0.25, raw)  # (1, 4, T, T)
    ends = [*range(15, 100, 16), 99]
    if name == "random_block":
        assert torch.equal(rows[..., ends, :], tokens[..., ends, :])
