"""Curvature against magnitude: does Forman-Ricci curvature see more than coarse weight?

For one prompt and one layer, Q and K are captured after RoPE (as the attention sees
them), coarsened to one max-L2 token per block, and turned into the coarse attention
graph A and its curvature F exactly as CAB forms them (:mod:`attnlab.kernels.reference`).
Each block-causal (query block, key block) pair of each head becomes one row, with a
flag for key blocks that hold a needle token, so the figure can show where the needle's
edges sit in the (A, F) plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from attnlab import capture, hooks
from attnlab.jobs import Curvature
from attnlab.kernels.reference import coarse_adjacency, coarsen_max_l2, forman_ricci

COLUMNS = ["head", "q_block", "k_block", "weight", "curvature", "needle", "diagonal"]


@torch.inference_mode()
def block_pairs(
    model,
    input_ids: Sequence[int],
    layer: int,
    block_size: int = 16,
    adjacency: str = "softmax",
    graph: str = "symmetric",
    needle_positions: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Coarse weight and curvature of every block-causal pair of every head of ``layer``.

    Returns columns :data:`COLUMNS` as arrays, rows ordered by (head, q_block, k_block).
    """
    store: dict = {}
    ids = torch.as_tensor([list(input_ids)], dtype=torch.long, device=model.device)
    with capture._rope_tap(model, [layer], store):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _, _, q, k = store[layer]  # post-RoPE: (1, H, T, D), (1, Hkv, T, D)
    scaling = hooks.decoder_layers(model)[layer].self_attn.scaling
    a = coarse_adjacency(
        coarsen_max_l2(q, block_size), coarsen_max_l2(k, block_size), scaling, adjacency
    )  # (1, H, M, M)
    f = forman_ricci(a, graph)
    h, m = a.shape[1], a.shape[-1]
    qb, kb = np.tril_indices(m)  # block-causal pairs, row-major
    needle_blocks = {p // block_size for p in needle_positions}
    return {
        "head": np.repeat(np.arange(h), len(qb)),
        "q_block": np.tile(qb, h),
        "k_block": np.tile(kb, h),
        "weight": a[0][:, qb, kb].flatten().cpu().numpy(),
        "curvature": f[0][:, qb, kb].flatten().cpu().numpy(),
        "needle": np.tile(np.isin(kb, list(needle_blocks)), h),
        "diagonal": np.tile(qb == kb, h),
    }


def write_block_pairs(job: Curvature) -> None:
    """:func:`block_pairs` of ``job.layer`` on the first NIAH prompt of ``job.length``
    tokens with its needle at ``job.depth`` (from the table ``job.prompts``), written to
    ``job.out``."""
    import pyarrow as pa

    from attnlab import models, tables
    from attnlab.errors import UserError
    from attnlab.niah import read_prompts
    from attnlab.policies import fields

    # CAB's fields, as its dataclass allows them (by hand, before the model loads)
    fields.check(
        "cab", {"block_size": job.block_size, "adjacency": job.adjacency, "graph": job.graph}
    )
    torch.set_num_threads(job.threads)
    pick = [
        p
        for p in read_prompts(job.prompts)
        if p.length == job.length and abs(p.depth - job.depth) < 1e-9
    ]
    if not pick:
        raise UserError(
            f"no NIAH prompt of length {job.length} and depth {job.depth} in {job.prompts}; "
            "pick one from niah.lengths and niah.depths"
        )
    prompt = pick[0]
    net, _, info = models.load(job.model, device=job.device, dtype=job.dtype)
    if not 0 <= job.layer < info.n_layers:
        last = info.n_layers - 1
        raise UserError(f"curvature.layer {job.layer} outside the model's layers 0..{last}")
    cols = block_pairs(
        net,
        prompt.input_ids,
        job.layer,
        job.block_size,
        job.adjacency,
        job.graph,
        prompt.needle_positions,
    )
    meta = {
        "model": job.model,
        "layer": job.layer,
        "length": job.length,
        "depth": job.depth,
        "block_size": job.block_size,
        "adjacency": job.adjacency,
        "graph": job.graph,
        "haystack": tables.meta(job.prompts).get("haystack"),
        "needle_positions": prompt.needle_positions,
    }
    tables.write(pa.table(cols), job.out, meta=meta)
