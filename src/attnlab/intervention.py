"""Query-scaling intervention: scale one head's query and watch its attention sharpen.

The query of one (layer, head) is multiplied by a factor after any QK-norm and before
RoPE (at the model's ``apply_rotary_pos_emb`` call, :mod:`attnlab.hooks`): scaling q by c
is softmax temperature 1/c, so entropy and k_eff should fall and the largest weight rise
as c grows. Every other head's query, and every key and value, stay as they were; the
two checks that every sweep records (:func:`sanity_check`, :func:`isolation_check`)
verify that on the model at hand.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnlab import attention, hooks
from attnlab.errors import UserError
from attnlab.jobs import Intervention, InterventionHeads
from attnlab.metrics import row_metrics

SWEEP_METRICS = ("entropy", "max_weight", "k_eff")
# The direction each metric should move as the scale grows (temperature 1/scale).
EXPECTED = {"entropy": "decreasing", "max_weight": "increasing", "k_eff": "decreasing"}


@dataclass(frozen=True)
class Head:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, name: str) -> Head:
        m = re.fullmatch(r"L(\d+)H(\d+)", name)
        if m is None:
            raise UserError(f"head {name!r} is not of the form L<layer>H<head>")
        return cls(int(m[1]), int(m[2]))

    def check(self, model) -> None:
        hooks.check_layers(model, [self.layer], f"head {self.name}: layer")
        n = model.config.num_attention_heads
        if not 0 <= self.head < n:
            raise UserError(f"head {self.name}: the model has heads 0..{n - 1}")


@contextlib.contextmanager
def scale_query(model, head: Head, scale: float) -> Iterator[None]:
    """While the block runs, multiply ``head``'s pre-RoPE query by ``scale``."""
    head.check(model)

    def before(layer, q, k):
        if layer != head.layer:
            return q, k
        q = q.clone()
        q[:, head.head] = q[:, head.head] * scale
        return q, k

    with hooks.at_rope(model, before=before):
        yield


@torch.inference_mode()
def sanity_check(model, tokens: np.ndarray, head: Head) -> float:
    """Largest |logit difference| between no intervention and scale 1.0 (should be 0)."""
    ids = torch.as_tensor(tokens, dtype=torch.long, device=model.device)
    plain = model(input_ids=ids, use_cache=False).logits
    with scale_query(model, head, 1.0):
        scaled = model(input_ids=ids, use_cache=False).logits
    return float((plain - scaled).abs().max())


def _layer_qkv(model, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Q and K after RoPE and V (before any GQA expansion) as the layer's attention gets them."""
    seen: dict[str, torch.Tensor] = {}

    def after(i, q, k, q_rot, k_rot):
        if i == layer:
            seen["q"], seen["k"] = q_rot.clone(), k_rot.clone()

    attn = hooks.decoder_layers(model)[layer].self_attn
    handle = attn.v_proj.register_forward_hook(lambda m, i, out: seen.__setitem__("v", out))
    try:
        with hooks.at_rope(model, after=after):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen


@torch.inference_mode()
def isolation_check(model, tokens: np.ndarray, head: Head, scale: float = 1.5) -> dict:
    """Which heads' Q, K and V of the target layer change under the intervention.

    Passes when only the target head's query changes (K and V bit for bit equal).
    """
    ids = torch.as_tensor(tokens, dtype=torch.long, device=model.device)
    plain = _layer_qkv(model, ids, head.layer)
    with scale_query(model, head, scale):
        moved = _layer_qkv(model, ids, head.layer)
    q_diff = (plain["q"] - moved["q"]).abs().amax(dim=(0, 2, 3))  # per head
    changed = [int(h) for h in torch.nonzero(q_diff > 0).flatten()]
    k_diff = float((plain["k"] - moved["k"]).abs().max())
    v_diff = float((plain["v"] - moved["v"]).abs().max())
    return {
        "scale": scale,
        "q_changed_heads": changed,
        "k_max_diff": k_diff,
        "v_max_diff": v_diff,
        "ok": changed == [head.head] and k_diff == 0.0 and v_diff == 0.0,
    }


class _Done(Exception):
    """Raised by the observer once the target layer is measured: later layers cannot
    change it, so the forward pass stops there."""


@torch.inference_mode()
def sweep(
    model,
    tokens: np.ndarray,
    head: Head,
    scales: Sequence[float],
    batch_size: int = 4,
    mass: float = 0.9,
    progress=None,
) -> dict[str, np.ndarray]:
    """Entropy, max weight and k_eff of ``head`` per (scale, sample, token) with its query
    scaled by each factor. Returns flat columns: scale, sample, token and the metrics."""
    cols: dict[str, list] = {k: [] for k in ("scale", "sample", "token", *SWEEP_METRICS)}
    n, t = tokens.shape

    def observe(layer, query, probs):
        if layer == head.layer:
            m = row_metrics(probs[:, head.head : head.head + 1], torch.arange(t), mass)
            found.update({k: v[:, 0].cpu().numpy() for k, v in m.items()})  # (B, T)
            raise _Done

    for scale in scales:
        with scale_query(model, head, scale):  # checks the head
            for start in range(0, n, batch_size):
                batch = torch.as_tensor(tokens[start : start + batch_size], device=model.device)
                found: dict[str, np.ndarray] = {}
                with contextlib.suppress(_Done), attention.observe(observe):
                    model(input_ids=batch, use_cache=False, logits_to_keep=1)
                b = batch.shape[0]
                cols["scale"].append(np.full(b * t, scale))
                cols["sample"].append(np.repeat(np.arange(start, start + b), t))
                cols["token"].append(np.tile(np.arange(t), b))
                for k in SWEEP_METRICS:
                    cols[k].append(found[k].reshape(-1))
                if progress is not None:
                    progress.update(b * t)
    return {k: np.concatenate(v) for k, v in cols.items()}


def pick_heads(metrics_dir, resamples: int = 2000, seed: int = 0) -> dict:
    """Target = the head whose query norm correlates most strongly (largest |r|) with its
    attention entropy in the capture tables; control = the weakest (smallest |r|)."""

    from attnlab import tables
    from attnlab.stats import head_pearson

    df, _ = tables.read_folder(metrics_dir, ["sample", "layer", "head", "q_norm", "entropy"])
    res = head_pearson(df, "q_norm", "entropy", resamples, seed)
    strength = np.abs(np.nan_to_num(res["r"], nan=0.0))
    out = {}
    for role, pick in (("target", np.argmax), ("control", np.argmin)):
        at = np.unravel_index(int(pick(strength)), strength.shape)
        out[role] = {
            "head": Head(int(at[0]), int(at[1])).name,
            "r": float(res["r"][at]),
            "r_lo": float(res["lo"][at]),
            "r_hi": float(res["hi"][at]),
        }
    return out


def choose_heads(job: InterventionHeads) -> None:
    """Resolve the target and control heads (``L<layer>H<head>``, or ``auto``: picked
    from the capture tables ``job.capture_metrics`` by :func:`pick_heads`) and write
    them, with how each was chosen, as JSON."""
    from attnlab import tables

    chosen = {}
    auto = None
    for role, value in (("target", job.target), ("control", job.control)):
        if value == "auto":
            if job.capture_metrics is None:
                raise UserError(f"intervention.{role} is auto but no capture tables were given")
            if auto is None:
                auto = pick_heads(job.capture_metrics, job.resamples, job.seed)
            chosen[role] = auto[role] | {
                "how": "auto: |r(query norm, entropy)| "
                + ("largest" if role == "target" else "smallest")
            }
        else:
            chosen[role] = {"head": Head.parse(value).name, "how": "config"}
    if chosen["target"]["head"] == chosen["control"]["head"]:
        raise UserError(f"target and control are the same head {chosen['target']['head']}")
    tables.write_json({"model": job.model, **chosen}, job.out)


def _checked(model, tokens: np.ndarray, head: Head, scale: float) -> dict:
    """Check the intervention on ``head`` before the sweep: scale 1.0 changes nothing, and
    scaling touches that head alone. Returns the checks; a failed one raises."""
    import sys

    sanity = sanity_check(model, tokens[:1], head)
    isolation = isolation_check(model, tokens[:1], head, scale)
    print(
        f"check: scale 1.0 against no intervention, largest logit difference {sanity:g}",
        file=sys.stderr,
    )
    print(f"check: isolation {isolation}", file=sys.stderr)
    if sanity > 1e-6 or not isolation["ok"]:
        raise UserError(
            f"the intervention on {head.name} failed its checks: scale 1.0 "
            f"differs by {sanity:g}; isolation {isolation}"
        )
    for metric, way in EXPECTED.items():
        print(f"expected as the scale grows: {metric} {way}", file=sys.stderr)
    return {"scale_one_max_logit_diff": sanity, "isolation": isolation}


def run_sweep(job: Intervention) -> None:
    """Sweep the query scale of ``job.head`` (the target or the control in
    ``job.heads``) over the corpus's first ``job.chunks`` chunks, after the checks, and
    write the per-token metrics."""
    import json
    import sys
    from pathlib import Path

    import pyarrow as pa
    from tqdm import tqdm

    from attnlab import models, tables
    from attnlab.corpus import read_corpus

    torch.set_num_threads(job.threads)
    chosen = json.loads(Path(job.heads).read_text())
    role = next((r for r in ("target", "control") if chosen[r]["head"] == job.head), None)
    if role is None:
        raise UserError(f"{job.head} is neither the target nor the control in {job.heads}")
    swept = Head.parse(job.head)
    tokens = read_corpus(job.manifest)[: job.chunks].astype("int64")
    net, _, _ = models.load(job.model)
    attention.install(net)
    swept.check(net)
    checks = _checked(net, tokens, swept, max(job.scales))
    with tqdm(
        total=len(job.scales) * tokens.size,
        unit="tok",
        unit_scale=True,
        desc=f"sweep {job.model} {swept.name}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        cols = sweep(net, tokens, swept, job.scales, job.batch_size, job.mass, bar)
    n = len(cols["scale"])
    cols |= {
        "model": [job.model] * n,
        "role": [role] * n,
        "layer": [swept.layer] * n,
        "head": [swept.head] * n,
    }
    meta = {
        "model": job.model,
        "role": role,
        "head": swept.name,
        "selection": chosen[role],
        "scales": job.scales,
        "chunks": int(len(tokens)),
        "mass": job.mass,
        "expected": EXPECTED,
        "checks": checks,
    }
    tables.write(pa.table(cols), job.out, meta=meta)
