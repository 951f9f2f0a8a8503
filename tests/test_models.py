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
