"""Curvature-masking kernels: plain-PyTorch references and their Triton versions.

``reference`` holds the definitions (and runs anywhere); ``coarsen``, ``adjacency``,
``curvature``, ``select`` and ``cab`` hold CAB's Triton kernels, ``xattention``
XAttention's estimate and threshold, ``quest`` Quest's page bound and ``budget`` every
block policy's budgeted choice. They need a CUDA GPU or ``TRITON_INTERPRET=1`` set
before they are first imported. The Triton names below load on first use, so importing
the references never imports Triton.
"""

from importlib import import_module

_LAZY = {
    "coarsen_max_l2": "coarsen",
    "coarse_adjacency": "adjacency",
    "adjacency_and_degrees": "adjacency",
    "forman_ricci": "curvature",
    "forman_ricci_from_degrees": "curvature",
    "BlockSelection": "select",
    "score_and_select": "select",
    "top_blocks": "select",
    "top_blocks_grouped": "select",
    "cab_select": "cab",
    "cab_scores": "cab",
    "block_shares": "xattention",
    "threshold_scores": "xattention",
    "page_bound": "quest",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
