"""Corpus sharding: SlimPajama-format records in, validated token-chunk Parquet shards out.

A record is ``{"text": ..., "meta": {"redpajama_set_name": ...}}``. Records come from a
Hugging Face dataset id (read through ``datasets``, streaming) or from local jsonl,
jsonl.gz or parquet files. They are filtered by source set, tokenized in batches, and
each document is cut into non-overlapping chunks of exactly ``chunk_len`` tokens (the
remainder of a document is dropped, so a chunk never spans two documents and is never
padded). Shards hold int32 token lists; a manifest records counts per source, tokens,
the config and each shard's sha256, and every read checks them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from attnlab import tables
from attnlab.errors import UserError
from attnlab.jobs import CorpusShard

SET_KEY = "redpajama_set_name"
DEFAULT_KEEP = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
    "PythonDocs",
)


def _local_files(source: Path) -> list[Path]:
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    files = [f for f in files if f.name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet"))]
    if not files:
        raise UserError(f"corpus source {source} holds no .jsonl, .jsonl.gz or .parquet files")
    return files


def _read_local(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(columns=["text", "meta"]):
            yield from batch.to_pylist()
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not a JSON record ({e.msg})") from e


def _read_hub(dataset_id: str, split: str) -> Iterator[dict]:
    try:
        import datasets

        yield from datasets.load_dataset(dataset_id, split=split, streaming=True)
    except (OSError, ConnectionError, ValueError) as e:
        raise UserError(
            f"cannot read dataset {dataset_id!r} from the Hugging Face hub "
            f"({str(e).splitlines()[0][:120]}); point corpus.source at local "
            "jsonl/parquet files in SlimPajama's format instead"
        ) from e


BUILTIN = "python-docs"
BUILTIN_SET = "PythonDocs"


def _read_builtin() -> Iterator[dict]:
    """CPython's help topics (``pydoc_data.topics``, in every Python install), one record
    per topic, labelled ``PythonDocs``: a small real corpus that needs no download."""
    import pydoc_data.topics

    for text in pydoc_data.topics.topics.values():
        yield {"text": text, "meta": {SET_KEY: BUILTIN_SET}}


def read_records(source: str, split: str = "train") -> Iterator[dict]:
    """Records from local files (a path that exists), the built-in ``python-docs``
    corpus, or a Hugging Face dataset id. A missing local path is refused here, before
    anything is read or shown."""
    if source == BUILTIN:
        return _read_builtin()
    path = Path(source)
    if path.exists():
        files = _local_files(path)
        return (record for f in files for record in _read_local(f))
    if source.startswith((".", "/")) or source.endswith((".jsonl", ".parquet", ".gz")):
        raise UserError(f"corpus source {source} does not exist")
    return _read_hub(source, split)


def _set_name(record: dict) -> str:
    meta = record.get("meta") or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    return meta.get(SET_KEY, "unknown")


def chunk_documents(
    records: Iterable[dict],
    tokenizer,
    chunk_len: int,
    keep_sets: Iterable[str],
    max_chunks: int | None = None,
    batch_size: int = 64,
    scan_all: bool = False,
) -> tuple[list[dict], dict]:
    """Filter, tokenize in batches and cut fixed-length chunks; returns (chunks, counts).

    Each chunk is ``{"chunk": i, "source": set name, "doc": doc index, "tokens": ids}``.
    counts holds documents kept and dropped per source and the chunk/token totals. Reading
    stops at ``max_chunks`` unless ``scan_all`` (for finite local files): then the rest is
    read without tokenizing, so the counts cover every record, and the kept documents that
    no chunk came from are counted as ``documents_unused``.
    """
    keep_sets = set(keep_sets)
    kept, dropped = Counter(), Counter()
    chunks: list[dict] = []
    batch: list[tuple[int, str, str]] = []
    bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, mininterval=5)

    def flush() -> bool:
        enc = tokenizer([t for _, _, t in batch], add_special_tokens=False)["input_ids"]
        for (doc, src, _), ids in zip(batch, enc, strict=True):
            bar.update(len(ids))
            for start in range(0, len(ids) - chunk_len + 1, chunk_len):
                chunks.append(
                    {
                        "chunk": len(chunks),
                        "source": src,
                        "doc": doc,
                        "tokens": ids[start : start + chunk_len],
                    }
                )
                if max_chunks is not None and len(chunks) >= max_chunks:
                    return True
        batch.clear()
        return False

    done = False
    unused: Counter = Counter()
    for doc, record in enumerate(records):
        src = _set_name(record)
        if src not in keep_sets:
            dropped[src] += 1
        elif done:
            unused[src] += 1
        else:
            kept[src] += 1
            batch.append((doc, src, record.get("text") or ""))
            if len(batch) >= batch_size and (done := flush()) and not scan_all:
                break
    if not done and batch:
        flush()
    bar.close()
    counts = {
        "documents_kept": dict(kept),
        "documents_dropped": dict(dropped),
        "documents_unused": dict(unused),
        "read_every_record": scan_all or not done,
        "chunks": len(chunks),
        "tokens": len(chunks) * chunk_len,
        "chunks_per_source": dict(Counter(c["source"] for c in chunks)),
    }
    return chunks, counts


def validate_tokens(
    tokens: np.ndarray, chunk_len: int, vocab_size: int, pad_id: int | None, where: str
) -> None:
    """Refuse chunks of the wrong length, out-of-vocabulary ids or padding."""
    if tokens.ndim != 2 or tokens.shape[1] != chunk_len:
        raise UserError(f"{where}: chunks are not all {chunk_len} tokens long")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError(f"{where}: token ids outside the vocabulary [0, {vocab_size})")
    if pad_id is not None and (tokens == pad_id).any():
        raise UserError(f"{where}: chunks contain the padding token {pad_id}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shards(
    chunks: list[dict],
    out_dir: str | Path,
    manifest_path: str | Path,
    chunk_len: int,
    vocab_size: int,
    pad_id: int | None,
    shard_size: int,
    meta: dict,
) -> dict:
    """Validate and write chunks as Parquet shards plus a JSON manifest; returns it."""
    if not chunks:
        raise UserError(
            "the corpus is empty after filtering: no document gave a full chunk "
            "(check corpus.keep_sets and corpus.chunk_len)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(0, len(chunks), shard_size):
        part = chunks[i : i + shard_size]
        tokens = np.asarray([c["tokens"] for c in part], dtype=np.int32)
        name = f"shard-{i // shard_size:05d}.parquet"
        validate_tokens(tokens, chunk_len, vocab_size, pad_id, name)
        table = pa.table(
            {
                "chunk": pa.array([c["chunk"] for c in part], pa.int64()),
                "source": pa.array([c["source"] for c in part], pa.string()),
                "doc": pa.array([c["doc"] for c in part], pa.int64()),
                "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), chunk_len),
            }
        )
        tables.write(table, out_dir / name, meta=meta)
        shards.append({"file": name, "chunks": len(part), "sha256": _sha256(out_dir / name)})
    manifest = {
        **meta,
        "chunk_len": chunk_len,
        "vocab_size": vocab_size,
        "pad_id": pad_id,
        "shards_dir": os.path.relpath(out_dir, Path(manifest_path).parent),
        "shards": shards,
    }
    tmp = Path(str(manifest_path) + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def read_shard(manifest_path: str | Path, shard: str) -> np.ndarray:
    """Tokens of one shard, (chunks, chunk_len) int32, after checking hash and contents.

    A missing, truncated or altered shard raises a UserError naming the file.
    """
    manifest = json.loads(Path(manifest_path).read_text())
    entry = next((s for s in manifest["shards"] if s["file"] == shard), None)
    path = Path(manifest_path).parent / manifest["shards_dir"] / shard
    if entry is None or not path.exists():
        raise UserError(f"shard {path} is not in its manifest or does not exist")
    if _sha256(path) != entry["sha256"]:
        raise UserError(
            f"shard {path} does not match its manifest's sha256 (truncated or "
            "altered): rebuild the corpus"
        )
    col = tables.read(path, ["tokens"])["tokens"]
    tokens = np.asarray(col.to_list(), dtype=np.int32).reshape(len(col), -1)
    validate_tokens(
        tokens, manifest["chunk_len"], manifest["vocab_size"], manifest["pad_id"], str(path)
    )
    return tokens


def read_corpus(manifest_path: str | Path) -> np.ndarray:
    """Every chunk of a corpus, in order: (chunks, chunk_len) int32."""
    manifest = json.loads(Path(manifest_path).read_text())
    return np.concatenate([read_shard(manifest_path, s["file"]) for s in manifest["shards"]])


def shard(job: CorpusShard) -> None:
    """Filter the source's records to ``job.keep_sets``, tokenize them with the model's
    tokenizer and cut at most ``job.max_chunks`` chunks of ``job.chunk_len`` tokens,
    written to the folder ``job.shards`` (``job.shard_size`` chunks each) and described
    by ``job.manifest``."""
    from transformers import AutoTokenizer

    from attnlab import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(job.model))
    records = read_records(job.source, job.split)
    local = Path(job.source).exists() or job.source == BUILTIN
    chunks, counts = chunk_documents(
        records, tokenizer, job.chunk_len, job.keep_sets, job.max_chunks, scan_all=local
    )
    pad = tokenizer.pad_token_id
    pad = None if pad in (tokenizer.eos_token_id, tokenizer.bos_token_id) else pad
    meta = {
        "model": job.model,
        "source": job.source,
        "split": job.split,
        "keep_sets": sorted(job.keep_sets),
        "max_chunks": job.max_chunks,
        **counts,
    }
    sizes = (job.chunk_len, len(tokenizer), pad, job.shard_size)
    write_shards(chunks, job.shards, job.manifest, *sizes, meta)
