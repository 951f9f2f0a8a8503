"""Coarse magnitude: CAB's ablation without curvature."""

from __future__ import annotations

from dataclasses import dataclass

from attnlab.policies.cab import CAB


@dataclass
class CoarseMagnitude(CAB):
    """CAB with lam = 0: key blocks ranked by coarse attention weight alone."""

    name = "coarse_magnitude"
    lam: float = 0.0
