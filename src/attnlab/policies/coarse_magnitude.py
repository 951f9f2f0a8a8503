"""Coarse magnitude: CAB's ablation without curvature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from attnlab.policies.cab import CAB
from attnlab.policies.fields import Range


@dataclass
class CoarseMagnitude(CAB):
    """CAB with lam = 0: key blocks ranked by coarse attention weight alone."""

    name = "coarse_magnitude"
    label = "coarse magnitude (λ=0)"
    lam: Annotated[float, Range(0, 1)] = 0.0
    """Weight of curvature (0: coarse magnitude alone, this policy's point)."""
