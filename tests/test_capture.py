"""Capture: metrics equal those from transformers' own eager attention weights; Q/K
capture feeds the attention; a killed corpus capture leaves nothing and resumes."""

import numpy as np
import pytest
import torch

from attnlab import capture, corpus, metrics, tables


def test_row_metrics_on_hand_made_rows():
    probs = torch.tensor(
        [
            [
                [
                    [1.0, 0.0, 0.0, 0.0],
                    [0.5, 0.5, 0.0, 0.0],
                    [0.7, 0.2, 0.1, 0.0],
                    [0.25, 0.25, 0.25, 0.25],
                ]
            ]
        ]
    )
    m = metrics.row_metrics(probs, torch.arange(4))
    assert torch.isnan(m["entropy"][0, 0, :2]).all()
    assert m["entropy"][0, 0, 3].item() == pytest.approx(np.log(4), abs=1e-6)
    assert m["k_eff"][0, 0].tolist() == [1, 2, 2, 4]  # 0.7 + 0.2 reaches 0.9 with 2 keys
    assert m["max_weight"][0, 0].tolist() == pytest.approx([1.0, 0.5, 0.7, 0.25])
    assert m["sink_mass"][0, 0].tolist() == pytest.approx([1.0, 0.5, 0.7, 0.25])


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_capture_equals_output_attentions_path(fixture, request):
    model, _, info = request.getfixturevalue(fixture)
    tokens = np.random.default_rng(0).integers(300, 5000, size=(2, 40))
    table, qk = capture.capture_metrics(model, tokens, info.n_kv_heads)
    assert qk.num_rows == 0  # no Q/K layers asked for
    assert table.num_rows == 2 * info.n_layers * info.n_heads * 40
    model.set_attn_implementation("eager")
    try:
        qs = {}
        hooks = [
            layer.self_attn.q_proj.register_forward_hook(
                lambda mod, i, out, idx=idx: qs.__setitem__(idx, out)
            )
            for idx, layer in enumerate(model.model.layers)
        ]
        with torch.inference_mode():
            out = model(torch.as_tensor(tokens), output_attentions=True)
        for h in hooks:
            h.remove()
    finally:
        from attnlab import attention

        attention.install(model)
    ref = torch.stack(out.attentions, dim=1)  # (B, L, H, T, T)
    b, n_layers, h, t, _ = ref.shape
    want = metrics.row_metrics(ref.reshape(b * n_layers, h, t, t), torch.arange(t))
    got = table.to_pydict()
    for name in metrics.METRICS:
        expected = (
            want[name].reshape(b, n_layers, h, t).numpy().ravel()
        )  # sample, layer, head, token
        np.testing.assert_allclose(np.asarray(got[name]), expected, atol=1e-4, equal_nan=True)
    if info.model_type == "llama":  # no QK-norm: the pre-RoPE query is the q_proj output
        q = torch.stack([qs[i] for i in range(n_layers)], 1).view(b, n_layers, t, h, -1)
        qn = q.norm(dim=-1).permute(0, 1, 3, 2).numpy().ravel()
        np.testing.assert_allclose(np.asarray(got["q_norm"]), qn, rtol=1e-4)
    assert set(got["kv_head"]) == set(range(info.n_kv_heads))


def test_row_metrics_are_nan_for_a_row_that_sees_nothing():
    probs = torch.tensor([[[[1.0, 0.0], [float("nan"), float("nan")]]]])
    m = metrics.row_metrics(probs, torch.tensor([5, 6]))
    for name in metrics.METRICS:
        assert not np.isnan(m[name][0, 0, 0].item()) and np.isnan(m[name][0, 0, 1].item())


def test_k_eff_matches_a_sort_of_every_row():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 300, 300, generator=g) * 3
    probs = torch.softmax(s.masked_fill(~torch.ones(300, 300, dtype=torch.bool).tril(), -1e9), -1)
    top = probs.double().sort(-1, descending=True).values.cumsum(-1)
    want = (top < 0.9 - 1e-6).sum(-1) + 1
    np.testing.assert_array_equal(metrics.k_eff(probs.numpy(), 0.9), want.numpy())


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_captured_q_and_k_are_what_the_attention_used(fixture, request, tmp_path):
    """Post-RoPE Q.K reproduces the eager attention weights; pre-RoPE has the same norms
    and, for Llama (no QK-norm), is the q_proj output itself."""
    model, _, info = request.getfixturevalue(fixture)
    tokens = np.random.default_rng(1).integers(300, 5000, size=(1, 24))
    layer = info.n_layers - 1
    _, qk = capture.capture_metrics(model, tokens, info.n_kv_heads, qk_layers=[layer])
    capture._write_ipc(qk, tmp_path / "shard-00000.arrow")
    q = torch.from_numpy(capture.read_qk(tmp_path, layer, "q", "post")).float()
    k = torch.from_numpy(capture.read_qk(tmp_path, layer, "k", "post")).float()
    q_pre = torch.from_numpy(capture.read_qk(tmp_path, layer, "q", "pre")).float()
    assert q.shape == (1, info.n_heads, 24, info.head_dim)
    assert k.shape == (1, info.n_kv_heads, 24, info.head_dim)
    torch.testing.assert_close(q_pre.norm(dim=-1), q.norm(dim=-1), rtol=2e-3, atol=2e-3)
    assert not torch.allclose(q_pre, q, atol=1e-2)  # the rotation did act
    model.set_attn_implementation("eager")
    try:
        seen = {}
        hook = model.model.layers[layer].self_attn.q_proj.register_forward_hook(
            lambda mod, i, out: seen.__setitem__("q", out)
        )
        with torch.inference_mode():
            out = model(torch.as_tensor(tokens), output_attentions=True)
        hook.remove()
    finally:
        from attnlab import attention

        attention.install(model)
    kk = k.repeat_interleave(info.n_heads // info.n_kv_heads, dim=1)
    scores = q @ kk.transpose(-1, -2) * model.model.layers[layer].self_attn.scaling
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(probs, out.attentions[layer].float(), atol=5e-3, rtol=0)
    if info.model_type == "llama":
        want = seen["q"].view(1, 24, info.n_heads, -1).transpose(1, 2)
        torch.testing.assert_close(q_pre, want, atol=2e-3, rtol=2e-3)


def _small_corpus(sharded, tmp_path, shard_size=3, n=6):
    _, manifest, chunks, tok = sharded
    return corpus.write_shards(
        chunks[:n],
        tmp_path / "shards",
        tmp_path / "manifest.json",
        128,
        len(tok),
        None,
        shard_size,
        {"source": "pydoc topics"},
    )


class _KillAfter:
    """A progress bar that stops the job (as a kill would) once ``tokens`` have passed."""

    def __init__(self, tokens):
        self.left = tokens

    def update(self, n):
        self.left -= n
        if self.left <= 0:
            raise KeyboardInterrupt


def test_killed_corpus_capture_leaves_nothing_and_resumes(smollm2, sharded, tmp_path):
    model, _, info = smollm2
    _small_corpus(sharded, tmp_path)
    job = lambda progress: capture.CorpusCapture(  # noqa: E731
        model,
        info.n_kv_heads,
        tmp_path / "manifest.json",
        chunks=5,
        batch_size=2,
        qk_layers=[1],
        qk_chunks=4,
        meta={"test": 1},
        progress=progress,
    )
    out = tmp_path / "capture"
    with pytest.raises(KeyboardInterrupt):  # killed during the second shard
        job(_KillAfter(4 * 128)).run(out / "metrics", out / "qk")
    assert not (out / "metrics").exists() and not (out / "qk").exists()
    (work,) = out.glob(".capture-work-*")
    assert [f.name for f in (work / "metrics").iterdir()] == ["shard-00000.parquet"]
    counts = job(None).run(out / "metrics", out / "qk")
    assert counts == {"chunks": 2, "resumed_chunks": 3, "tokens": 2 * 128}
    assert not work.exists()
    files = sorted(p.name for p in (out / "metrics").iterdir())
    assert files == ["shard-00000.parquet", "shard-00001.parquet"]
    df = tables.read(out / "metrics")
    assert sorted(df["sample"].unique().to_list()) == [0, 1, 2, 3, 4]
    assert df.height == 5 * info.n_layers * info.n_heads * 128
    assert set(df["source"].unique().to_list()) == {"RedPajamaWikipedia"}
    assert tables.meta(out / "metrics" / "shard-00001.parquet")["test"] == 1
    q = capture.read_qk(out / "qk", 1, "q", "pre")
    assert q.shape == (4, info.n_heads, 128, info.head_dim)  # qk_chunks = 4 of 5

    fresh = tmp_path / "fresh"
    job(None).run(fresh / "metrics", fresh / "qk")
    again = tables.read(fresh / "metrics").sort(["sample", "layer", "head", "token"])
    assert again.equals(df.sort(["sample", "layer", "head", "token"]))


def test_k_eff_on_the_tensors_device_matches_the_numpy_sort():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(2, 2, 64, 64, generator=g) * 2, -1)
    np.testing.assert_array_equal(
        metrics.k_eff_torch(probs).numpy(), metrics.k_eff(probs.numpy(), 0.9)
    )
