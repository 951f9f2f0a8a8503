"""Per-token attention measurements, computed from attention weights row by row.

For a query row with weights p over the keys it sees: entropy -sum p log p (nats; NaN
for the first two positions, whose rows see one or two keys), the largest weight, the
effective span k_eff (the fewest keys holding ``mass`` of the weight), and the sink mass
p[0]. All in float32; masked keys carry weight 0 and never count.
"""

from __future__ import annotations

import torch

METRICS = ("entropy", "max_weight", "k_eff", "sink_mass")


def row_metrics(probs: torch.Tensor, q_pos: torch.Tensor, mass: float = 0.9) -> dict:
    """Metrics of attention rows. probs: (B, H, Tq, Tk), rows summing to 1 over what they
    see; q_pos: (Tq,) absolute positions. Returns a dict of (B, H, Tq) float32 tensors."""
    p = probs.float()
    logp = torch.log(p.clamp_min(1e-30))
    entropy = -(p * logp).sum(-1)  # 0 log 0 = 0 since p = 0 there
    entropy = entropy.masked_fill((q_pos < 2).to(p.device), float("nan"))
    top = p.sort(dim=-1, descending=True).values.cumsum(-1)  # (B, H, Tq, Tk)
    k_eff = (top < mass - 1e-6).sum(-1) + 1  # the key that crosses the mass counts
    return {
        "entropy": entropy,
        "max_weight": p.amax(-1),
        "k_eff": k_eff.float(),
        "sink_mass": p[..., 0],
    }


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
