"""Capture metrics equal those computed from transformers' own eager attention weights."""

import numpy as np
import pytest
import torch

from attnlab import capture, metrics


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
    table = capture.capture_metrics(model, tokens, info.n_kv_heads)
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
        from attnlab import sparse

        sparse.install(model)
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
