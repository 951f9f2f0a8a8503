"""Query-scaling intervention and gain: one head moves, scale 1 is the model, gains have
the sign that softmax temperature implies."""

import numpy as np
import polars as pl
import pytest
import torch

from attnlab import gain, hooks, intervention, metrics, stats, tables
from attnlab.errors import UserError
from attnlab.intervention import Head


def _rotated_qk(model, tokens, layer):
    seen = {}

    def after(i, q, k, q_rot, k_rot):
        if i == layer:
            seen["q"], seen["k"] = q_rot.clone(), k_rot.clone()

    with torch.inference_mode(), hooks.at_rope(model, after=after):
        model(input_ids=torch.as_tensor(tokens), use_cache=False, logits_to_keep=1)
    return seen


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_scaling_moves_exactly_one_head_by_exactly_the_factor(fixture, request):
    """RoPE is linear, so a query scaled before it arrives scaled by the same factor; had
    the scale acted before Gemma's QK-norm, the norm would have undone it."""
    model, _, info = request.getfixturevalue(fixture)
    tokens = np.random.default_rng(0).integers(300, 5000, size=(1, 32))
    head = Head(2, 1)
    plain = _rotated_qk(model, tokens, 2)
    with intervention.scale_query(model, head, 1.5):
        moved = _rotated_qk(model, tokens, 2)
    torch.testing.assert_close(moved["q"][:, 1], 1.5 * plain["q"][:, 1], rtol=1e-5, atol=1e-5)
    others = [h for h in range(info.n_heads) if h != 1]
    assert torch.equal(moved["q"][:, others], plain["q"][:, others])
    assert torch.equal(moved["k"], plain["k"])
    report = intervention.isolation_check(model, tokens, head)
    assert report["ok"] and report["q_changed_heads"] == [1]
    assert intervention.sanity_check(model, tokens, head) == 0.0


def test_a_bad_head_is_refused_in_one_line(smollm2):
    model, _, info = smollm2
    with pytest.raises(UserError, match="heads 0..8"):
        Head(0, info.n_heads).check(model)
    with pytest.raises(UserError, match="layers 0..29"):
        Head(info.n_layers, 0).check(model)
    with pytest.raises(UserError, match="L<layer>H<head>"):
        Head.parse("layer3")


def test_sweep_of_the_real_model_sharpens_with_the_scale(smollm2):
    model, _, _ = smollm2
    tokens = np.random.default_rng(1).integers(300, 5000, size=(2, 48))
    cols = intervention.sweep(model, tokens, Head(3, 0), [0.5, 1.0, 2.0], batch_size=2)
    df = pl.DataFrame(cols)
    assert df.height == 3 * 2 * 48
    means = df.group_by("scale").agg(pl.col("max_weight").mean()).sort("scale")
    assert means["max_weight"].is_sorted() and means["max_weight"][0] < means["max_weight"][2]


def _synthetic_sweep(scales, sharpen: bool, role: str, seed=0):
    """Attention of one head from random scores: a sharpening head's logits scale with the
    factor (temperature 1/scale); a control head's do not depend on it."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, 1, 40, 40, generator=g) * 2
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    frames = []
    for c in scales:
        probs = torch.softmax((s * (c if sharpen else 1.0)).masked_fill(~causal, -1e9), -1)
        m = metrics.row_metrics(probs, torch.arange(40))
        frames.append(
            pl.DataFrame(
                {
                    "scale": np.full(3 * 40, c),
                    "sample": np.repeat(np.arange(3), 40),
                    "token": np.tile(np.arange(40), 3),
                    **{k: m[k][:, 0].numpy().ravel() for k in intervention.SWEEP_METRICS},
                    "role": [role] * 120,
                    "layer": [0] * 120,
                    "head": [0 if sharpen else 1] * 120,
                }
            )
        )
    return pl.concat(frames)


def test_gain_has_the_sign_of_sharpening_and_a_null_is_reported_as_null():
    scales = [0.5, 0.75, 1.0, 1.25, 1.5]
    rows = gain.gain_rows(
        _synthetic_sweep(scales, True, "target"), _synthetic_sweep(scales, False, "control"), 500
    )
    by = {(r["metric"], r["role"]): r for r in rows}
    assert by["max_weight", "target"]["gain_lo"] > 0
    assert by["entropy", "target"]["gain_hi"] < 0
    assert by["k_eff", "target"]["gain_hi"] < 0
    assert by["max_weight", "target"]["verdict"].startswith("increasing, as expected")
    for metric in intervention.SWEEP_METRICS:
        control = by[metric, "control"]
        assert control["gain"] == pytest.approx(0, abs=1e-9)
        assert control["verdict"].startswith("no monotone trend")


def _clustered_sweep(slopes, tokens, scales, noise, role, seed):
    """A sweep whose metric rises along log(scale) with a slope fixed per chunk (the
    chunk's tokens share it) plus independent token noise: entropy = b_chunk log(scale)."""
    rng = np.random.default_rng(seed)
    n = len(slopes) * tokens
    frames = []
    for c in scales:
        value = np.repeat(slopes, tokens) * np.log(c) + noise * rng.standard_normal(n)
        frames.append(
            pl.DataFrame(
                {
                    "scale": np.full(n, c),
                    "sample": np.repeat(np.arange(len(slopes)), tokens),
                    "token": np.tile(np.arange(tokens), len(slopes)),
                    **{k: value for k in intervention.SWEEP_METRICS},
                    "layer": [0] * n,
                    "head": [0 if role == "target" else 1] * n,
                }
            )
        )
    return pl.concat(frames)


def test_gain_interval_resamples_chunks_and_has_the_clustered_width():
    """Slopes that vary by chunk (sd 0.3 over 40 chunks of 64 tokens), little token noise:
    the gain's interval must have the width the chunks imply, 2 x 1.96 x sd / sqrt(40),
    where a bootstrap over tokens would be several times narrower."""
    rng = np.random.default_rng(0)
    n_chunks, tokens, scales = 40, 64, [0.5, 0.75, 1.0, 1.25, 1.5]
    slopes = -1.0 + 0.3 * rng.standard_normal(n_chunks)
    target = _clustered_sweep(slopes, tokens, scales, 0.05, "target", 1)
    control = _clustered_sweep(np.full(n_chunks, 0.5), tokens, scales, 0.05, "control", 2)
    by = {(r["metric"], r["role"]): r for r in gain.gain_rows(target, control, 4000, seed=0)}
    row = by["entropy", "target"]
    assert row["resampled"] == "chunk" and row["chunks"] == n_chunks
    assert row["gain"] == pytest.approx(slopes.mean(), abs=0.01)
    width = row["gain_hi"] - row["gain_lo"]
    analytic = 2 * 1.96 * slopes.std() / np.sqrt(n_chunks)  # the plug-in bootstrap's width
    assert width == pytest.approx(analytic, rel=0.15)
    # The same data resampled by token (every token its own cluster): far too narrow.
    _, t_mat, _, _ = gain.unit_matrices(target, control, "entropy")
    x = np.log(scales)
    by_token = gain.slope(x, stats.cluster_bootstrap(t_mat, 2000, 0) / len(t_mat))
    token_width = np.subtract(*stats.percentile_interval(by_token)[::-1])
    assert width > 5 * token_width
    # The verdict counts chunks: a finite p, and every chunk with the sign.
    assert 0 < row["chunk_p"] < 1e-6
    assert "40 of 40 chunks" in row["verdict"]
    # The ratio to the control (gain 0.5) is about -2 with an interval from the chunks.
    assert row["ratio_lo"] < slopes.mean() / 0.5 < row["ratio_hi"]


def test_gain_verdict_counts_chunks_not_tokens():
    """Two chunks that agree in sign but not in size: thousands of (scale, token) pairs
    would make any trend significant; two chunks cannot."""
    target = _clustered_sweep(np.array([-1.0, -0.2]), 256, [0.5, 1.0, 1.5], 0.01, "target", 3)
    control = _clustered_sweep(np.array([0.1, 0.3]), 256, [0.5, 1.0, 1.5], 0.01, "control", 4)
    by = {(r["metric"], r["role"]): r for r in gain.gain_rows(target, control, 500)}
    assert by["entropy", "target"]["chunk_p"] > 0.05
    assert by["entropy", "target"]["verdict"].startswith("no monotone trend (2 of 2 chunks")


def test_auto_heads_come_from_the_capture_tables(tmp_path):
    """A planted head whose query norm tracks its entropy is the target; a head with no
    relation at all is the control."""
    rng = np.random.default_rng(0)
    rows = []
    for sample in range(6):
        qn = rng.normal(size=(2, 2, 50))
        ent = rng.normal(size=(2, 2, 50)) + 0.3 * qn  # every head a little related
        ent[1, 0] = -2.0 * qn[1, 0] + 0.1 * rng.normal(size=50)  # L1H0: strongly
        ent[0, 1] = rng.normal(size=50)  # L0H1: not at all
        for layer in range(2):
            for head in range(2):
                rows.append(
                    pl.DataFrame(
                        {
                            "sample": [sample] * 50,
                            "layer": [layer] * 50,
                            "head": [head] * 50,
                            "q_norm": qn[layer, head],
                            "entropy": ent[layer, head],
                        }
                    )
                )
    tables.write(pl.concat(rows).to_arrow(), tmp_path / "shard-00000.parquet")
    picked = intervention.pick_heads(tmp_path, resamples=200)
    assert picked["target"]["head"] == "L1H0" and picked["target"]["r"] < -0.9
    assert picked["control"]["head"] == "L0H1"
