"""Attention capture: per (sample, layer, head, token) measurements in one forward pass.

Every layer's attention weights pass through :func:`attnlab.attention.observe` as the
layer runs and are reduced at once to per-token metrics (:mod:`attnlab.metrics`) and
the query norm, so memory holds one layer's weights at a time, whatever the depth.
The query norm is taken after RoPE, which rotates pairs of dimensions and so leaves
the norm of the pre-RoPE query (after any QK-norm) unchanged.

Q and K of chosen layers are taken at the model's own ``apply_rotary_pos_emb`` call,
before and after the rotation, so "pre-RoPE" means after any QK-norm, as the attention
sees them. :class:`CorpusCapture` runs a whole sharded corpus: one metrics file (and
one Q/K file) per shard, each complete or absent, kept in a work folder until every
shard is done, so a killed job resumes at the first shard it had not finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from attnlab import attention, hooks, tables
from attnlab.errors import UserError
from attnlab.jobs import Capture
from attnlab.metrics import METRICS, row_metrics

QK_SUFFIX = ".arrow"


@contextlib.contextmanager
def _rope_tap(model, layers: Sequence[int], store: dict) -> Iterator[None]:
    """Record, for each layer in ``layers``, Q and K before and after RoPE into ``store``
    as ``store[layer] = (q_pre, k_pre, q_post, k_post)`` ((B, H or Hkv, T, D) tensors)."""
    if not layers:
        yield
        return
    hooks.check_layers(model, layers, "capture.layers")
    wanted = set(layers)

    def keep(layer, q, k, q_rot, k_rot):
        if layer in wanted:
            store[layer] = (q, k, q_rot, k_rot)

    with hooks.at_rope(model, after=keep):
        yield


def _qk_table(store: dict, sample_offset: int) -> pa.Table:
    """Rows (sample, layer, tensor, rope, head) with the (T, D) float16 matrix in ``data``."""
    cols: dict[str, list] = {k: [] for k in ("sample", "layer", "tensor", "rope", "head")}
    data = []
    for layer in sorted(store):
        for tensor, rope, x in zip(
            "qkqk", ("pre", "pre", "post", "post"), store[layer], strict=True
        ):
            x = x.detach().to("cpu", torch.float16).numpy()  # (B, H, T, D)
            b, h = x.shape[:2]
            cols["sample"] += np.repeat(np.arange(b) + sample_offset, h).tolist()
            cols["head"] += np.tile(np.arange(h), b).tolist()
            cols["layer"] += [layer] * b * h
            cols["tensor"] += [tensor] * b * h
            cols["rope"] += [rope] * b * h
            data.append(x.reshape(b * h, -1))
    if not data:
        return pa.table({})
    flat = np.concatenate(data)
    _, _, t, d = store[min(store)][0].shape
    table = pa.table(
        {
            "sample": pa.array(cols["sample"], pa.int32()),
            "layer": pa.array(cols["layer"], pa.int16()),
            "tensor": pa.array(cols["tensor"], pa.string()).dictionary_encode(),
            "rope": pa.array(cols["rope"], pa.string()).dictionary_encode(),
            "head": pa.array(cols["head"], pa.int16()),
            "data": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
        }
    )
    return table.replace_schema_metadata({"tokens": str(t), "head_dim": str(d)})


@torch.inference_mode()
def capture_metrics(
    model,
    tokens: np.ndarray,
    n_kv_heads: int,
    mass: float = 0.9,
    sample_offset: int = 0,
    qk_layers: Sequence[int] = (),
) -> tuple[pa.Table, pa.Table]:
    """Metrics of every (sample, layer, head, token) for chunks ``tokens`` (N, T) int.

    The model must use the ``attnlab`` attention (:func:`attnlab.attention.install`).
    Returns the metrics table, ordered by sample, layer, head, token, with columns sample,
    layer, head, kv_head, token, q_norm and the metrics (float32, NaN where undefined:
    entropy of the first two tokens), and the Q/K table of ``qk_layers`` (see
    :func:`read_qk`; empty when no layer is asked for).
    """
    n_layers = model.config.num_hidden_layers
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=model.device)
    b, t = ids.shape
    out: dict[str, torch.Tensor] = {}  # name -> (L, B, H, T), one layer filled at a time

    def observe(layer: int, query: torch.Tensor, probs: torch.Tensor) -> None:
        cols = row_metrics(probs, torch.arange(t), mass)
        cols["q_norm"] = query.float().norm(dim=-1)  # (B, H, T)
        for name, v in cols.items():
            v = v.cpu()
            if name not in out:
                out[name] = torch.full((n_layers, *v.shape), float("nan"))
            out[name][layer] = v

    store: dict = {}
    with attention.observe(observe), _rope_tap(model, qk_layers, store):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    h = out["q_norm"].shape[2]
    sample, layer, head, token = np.indices((b, n_layers, h, t)).reshape(4, -1)
    groups = max(h // n_kv_heads, 1)
    table = {
        "sample": pa.array(sample + sample_offset, pa.int32()),
        "layer": pa.array(layer, pa.int16()),
        "head": pa.array(head, pa.int16()),
        "kv_head": pa.array(head // groups, pa.int16()),
        "token": pa.array(token, pa.int32()),
    }
    for name in ("q_norm", *METRICS):
        table[name] = pa.array(out[name].permute(1, 0, 2, 3).reshape(-1).numpy())
    return pa.table(table), _qk_table(store, sample_offset)


def read_qk(qk_dir: str | Path, layer: int, tensor: str, rope: str) -> np.ndarray:
    """Captured Q or K of one layer from every shard: (samples, heads, T, D) float16."""
    files = sorted(Path(qk_dir).glob(f"*{QK_SUFFIX}"))
    parts = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            table = pa.ipc.open_file(src).read_all()
        t, d = int(table.schema.metadata[b"tokens"]), int(table.schema.metadata[b"head_dim"])
        mask = pc.and_(
            pc.equal(table["layer"], layer),
            pc.and_(
                pc.equal(table["tensor"].cast(pa.string()), tensor),
                pc.equal(table["rope"].cast(pa.string()), rope),
            ),
        )
        part = table.filter(mask).sort_by([("sample", "ascending"), ("head", "ascending")])
        if part.num_rows:
            flat = part["data"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            n_samples = len(set(part["sample"].to_pylist()))
            parts.append(flat.reshape(n_samples, -1, t, d))
    if not parts:
        raise UserError(f"no captured {tensor} ({rope}-RoPE) of layer {layer} in {qk_dir}")
    return np.concatenate(parts)


def _write_ipc(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)


def work_key(meta: dict) -> str:
    """Names the work folder of one capture setting: same inputs, same folder."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CorpusCapture:
    """Capture of the first ``chunks`` chunks of a sharded corpus (see :meth:`run`)."""

    model: torch.nn.Module
    n_kv_heads: int
    manifest_path: Path
    chunks: int
    batch_size: int = 8
    mass: float = 0.9
    qk_layers: Sequence[int] = ()
    qk_chunks: int = 0
    meta: dict = field(default_factory=dict)
    progress: object = None  # a tqdm bar, updated in tokens

    def run(self, metrics_dir: str | Path, qk_dir: str | Path) -> dict:
        """Write one metrics file (and one Q/K file) per shard; returns counts.

        Each shard's files go to a work folder beside ``metrics_dir`` as soon as the
        shard is done; a rerun with the same inputs skips finished shards. Once all are
        done the files move into ``metrics_dir`` and ``qk_dir`` and the work folder goes.
        """
        manifest = json.loads(Path(self.manifest_path).read_text())
        metrics_dir, qk_dir = Path(metrics_dir), Path(qk_dir)
        work = metrics_dir.parent / f".capture-work-{work_key(self.meta)}"
        (work / "metrics").mkdir(parents=True, exist_ok=True)
        (work / "qk").mkdir(parents=True, exist_ok=True)
        total = min(self.chunks, sum(s["chunks"] for s in manifest["shards"]))
        done = {"chunks": 0, "resumed_chunks": 0, "tokens": 0}
        offset = 0
        for shard in manifest["shards"]:
            if offset >= total:
                break
            n = min(shard["chunks"], total - offset)
            stem = Path(shard["file"]).stem
            paths = (work / "metrics" / f"{stem}.parquet", work / "qk" / f"{stem}{QK_SUFFIX}")
            wants_qk = bool(self.qk_layers) and offset < self.qk_chunks
            if paths[0].exists() and (paths[1].exists() or not wants_qk):
                done["resumed_chunks"] += n
                self._advance(n * manifest["chunk_len"])
            else:
                self._shard(shard["file"], n, offset, wants_qk, *paths)
                done["chunks"] += n
                done["tokens"] += n * manifest["chunk_len"]
            offset += n
        return _finish(work, metrics_dir, qk_dir, done)

    def _advance(self, tokens: int) -> None:
        if self.progress is not None:
            self.progress.update(tokens)

    def _shard(
        self, shard: str, n: int, offset: int, wants_qk: bool, m_path: Path, q_path: Path
    ) -> None:
        """Capture the first ``n`` chunks of one shard; write its metrics (and Q/K) files."""
        from attnlab.corpus import read_shard

        tokens = read_shard(self.manifest_path, shard)[:n]
        m_parts, q_parts = [], []
        for start in range(0, n, self.batch_size):
            batch = tokens[start : start + self.batch_size]
            first = offset + start
            layers = self.qk_layers if wants_qk and first < self.qk_chunks else ()
            m, q = capture_metrics(self.model, batch, self.n_kv_heads, self.mass, first, layers)
            m_parts.append(m)
            if q.num_rows:
                q_parts.append(q.filter(pc.less(q["sample"], self.qk_chunks)))
            self._advance(batch.size)
        table = pa.concat_tables(m_parts)
        sources = pa.array(_shard_sources(self.manifest_path, shard, n)).dictionary_encode()
        src = sources.take(pc.subtract(table["sample"], pa.scalar(offset, pa.int32())))
        meta = self.meta | {"shard": Path(shard).stem}
        tables.write(table.append_column("source", src), m_path, meta=meta)
        if q_parts:
            qk = pa.concat_tables(q_parts).replace_schema_metadata(q_parts[0].schema.metadata)
            _write_ipc(qk, q_path)


def _shard_sources(manifest_path, shard: str, n: int) -> list[str]:
    manifest = json.loads(Path(manifest_path).read_text())
    path = Path(manifest_path).parent / manifest["shards_dir"] / shard
    return tables.read(path, ["source"])["source"].to_list()[:n]


def _finish(work: Path, metrics_dir: Path, qk_dir: Path, done: dict) -> dict:
    for sub, dest in (("metrics", metrics_dir), ("qk", qk_dir)):
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in sorted((work / sub).iterdir()):
            if not f.name.endswith(".tmp"):
                f.replace(dest / f.name)
    shutil.rmtree(work)
    return done


def capture_corpus(job: Capture) -> None:
    """Capture the corpus's first ``job.chunks`` chunks (:class:`CorpusCapture`):
    per-token metrics to the folder ``job.metrics``, Q/K of ``job.qk_layers`` on the
    first ``job.qk_chunks`` chunks to the folder ``job.qk``."""
    import sys

    from tqdm import tqdm

    from attnlab import models
    from attnlab.sources import module_sources

    torch.set_num_threads(job.threads)
    corpus = json.loads(Path(job.manifest).read_text())
    chunks = min(job.chunks, corpus["chunks"])
    layers = sorted(job.qk_layers)
    # The resume folder is keyed by every module the capture runs, as the rule's inputs are.
    code = b"".join(Path(f).read_bytes() for f in module_sources("capture"))
    meta = {
        "model": job.model,
        "manifest_sha256": hashlib.sha256(Path(job.manifest).read_bytes()).hexdigest(),
        "chunk_len": corpus["chunk_len"],
        "chunks": chunks,
        "mass": job.mass,
        "qk_layers": layers,
        "qk_chunks": job.qk_chunks,
        "code_sha256": hashlib.sha256(code).hexdigest(),
    }
    net, _, info = models.load(job.model, device=job.device, dtype=job.dtype)
    attention.install(net)
    total = chunks * corpus["chunk_len"]
    with tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"capture {job.model}",
        mininterval=5,
        file=sys.stderr,
    ) as bar:
        run = CorpusCapture(
            net,
            info.n_kv_heads,
            Path(job.manifest),
            chunks,
            job.batch_size,
            job.mass,
            layers,
            job.qk_chunks,
            meta,
            bar,
        )
        counts = run.run(job.metrics, job.qk)
    print(f"captured {counts}", file=sys.stderr)
