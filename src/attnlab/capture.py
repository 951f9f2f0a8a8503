"""Attention capture: per (sample, layer, head, token) measurements in one forward pass.

Every layer's attention weights pass through :func:`attnlab.sparse.observe` as the
layer runs and are reduced at once to per-token metrics (:mod:`attnlab.metrics`) and
the query norm, so memory holds one layer's weights at a time, whatever the depth.
The query norm is taken after RoPE, which rotates pairs of dimensions and so leaves
the norm of the pre-RoPE query (after any QK-norm) unchanged.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from attnlab import sparse
from attnlab.metrics import METRICS, row_metrics


@torch.inference_mode()
def capture_metrics(
    model, tokens: np.ndarray, n_kv_heads: int, mass: float = 0.9, sample_offset: int = 0
) -> pa.Table:
    """Metrics of every (sample, layer, head, token) for chunks ``tokens`` (N, T) int.

    The model must use the ``attnlab`` attention (:func:`attnlab.sparse.install`).
    Returns a table with columns sample, layer, head, kv_head, token, q_norm and the
    metrics; float32, NaN where undefined (entropy of the first two tokens).
    """
    parts: list[dict[str, np.ndarray]] = []

    def observe(layer: int, query: torch.Tensor, probs: torch.Tensor) -> None:
        b, h, t, tk = probs.shape
        q_pos = torch.arange(tk - t, tk, device=probs.device)
        cols = row_metrics(probs, q_pos, mass)
        cols["q_norm"] = query.float().norm(dim=-1)  # (B, H, T)
        grid = np.stack(np.meshgrid(np.arange(b), np.arange(h), np.arange(t), indexing="ij"))
        part = {k: v.reshape(-1).cpu().numpy().astype(np.float32) for k, v in cols.items()}
        part |= {
            "sample": grid[0].reshape(-1) + sample_offset,
            "layer": np.full(b * h * t, layer),
            "head": grid[1].reshape(-1),
            "token": grid[2].reshape(-1),
        }
        parts.append(part)

    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=model.device)
    with sparse.observe(observe):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    groups = len(np.unique(cat["head"])) // n_kv_heads
    table = {
        "sample": pa.array(cat["sample"], pa.int32()),
        "layer": pa.array(cat["layer"], pa.int16()),
        "head": pa.array(cat["head"], pa.int16()),
        "kv_head": pa.array(cat["head"] // max(groups, 1), pa.int16()),
        "token": pa.array(cat["token"], pa.int32()),
        "q_norm": pa.array(cat["q_norm"]),
        **{m: pa.array(cat[m]) for m in METRICS},
    }
    order = np.lexsort((cat["token"], cat["head"], cat["layer"], cat["sample"]))
    return pa.table(table).take(pa.array(order))
