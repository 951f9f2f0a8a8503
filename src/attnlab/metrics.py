"""Per-token attention measurements, computed from attention weights row by row.

For a query row with weights p over the keys it sees: entropy -sum p log p (nats; NaN
for the first two positions, whose rows see one or two keys), the largest weight, the
effective span k_eff (the fewest keys holding ``mass`` of the weight), and the sink mass
p[0]. All in float32; masked keys carry weight 0 and never count. A row holding NaN (a
query that sees no key at all) gets NaN for every metric.

k_eff needs the weights of each row in order. numpy's vectorised sort is several times
faster than torch's on the CPU, and rows of a causal block of queries are sorted only
over the keys that block can see, so k_eff costs about as much as the entropy.
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("entropy", "max_weight", "k_eff", "sink_mass")
ROW_BLOCK = 128  # query rows sorted together, over the keys the block gives weight to


def k_eff(probs: np.ndarray, mass: float = 0.9) -> np.ndarray:
    """Fewest keys whose weights reach ``mass``, per row. probs: (..., Tq, Tk) float32 with
    zeros where a key is masked. Returns (..., Tq) float32."""
    tq, tk = probs.shape[-2:]
    flat = probs.reshape(-1, tq, tk)
    out = np.empty(flat.shape[:2], dtype=np.float32)
    for start in range(0, tq, ROW_BLOCK):
        block = flat[:, start : start + ROW_BLOCK]
        seen = np.flatnonzero(block.any(axis=(0, 1)))  # keys with weight anywhere in the block
        width = int(seen[-1]) + 1 if seen.size else 1
        top = np.sort(block[..., :width], axis=-1)[..., ::-1]
        reached = np.cumsum(top, axis=-1, dtype=np.float64) < mass - 1e-6
        out[:, start : start + ROW_BLOCK] = reached.sum(-1) + 1  # the key that crosses counts
    return out.reshape(probs.shape[:-1])


def k_eff_torch(probs: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """:func:`k_eff` on the tensor's own device (for CUDA, where the sort is fast)."""
    top = probs.sort(dim=-1, descending=True).values.double().cumsum(-1)
    return ((top < mass - 1e-6).sum(-1) + 1).float()


def row_metrics(probs: torch.Tensor, q_pos: torch.Tensor, mass: float = 0.9) -> dict:
    """Metrics of attention rows. probs: (B, H, Tq, Tk), rows summing to 1 over what they
    see; q_pos: (Tq,) absolute positions. Returns a dict of (B, H, Tq) float32 tensors on
    the device of ``probs``."""
    p = probs.detach().float()
    bad = torch.isnan(p).any(-1)  # (B, H, Tq)
    if bad.any():
        p = torch.where(bad[..., None], 0.0, p)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
    entropy = entropy.masked_fill(q_pos.to(p.device) < 2, float("nan"))
    span = torch.from_numpy(k_eff(p.numpy(), mass)) if p.is_cpu else k_eff_torch(p, mass)
    cols = {
        "entropy": entropy,
        "max_weight": p.amax(-1),
        "k_eff": span,
        "sink_mass": p[..., 0].clone(),
    }
    if bad.any():
        cols = {k: v.masked_fill(bad, float("nan")) for k, v in cols.items()}
    return cols


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention weights of query rows. q: (B, H, Tq, D); k: (B, H, Tk, D);
    visible: bool broadcastable to (B, H, Tq, Tk). Returns (B, H, Tq, Tk) float32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return torch.softmax(torch.where(visible, s, float("-inf")), dim=-1)
