"""Corpus sharding on real text: CPython's pydoc topics, and the shared sample when present."""

import pydoc_data.topics
from pathlib import Path

import numpy as np
import pytest

from attnlab import corpus
from attnlab.errors import UserError

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/slimpajama_sample.jsonl"


def test_sources_are_filtered_and_chunks_come_from_one_document(sharded):
    out, manifest, chunks, tok = sharded
    assert manifest["documents_dropped"] == {"RedPajamaGithub": 16}
    assert set(manifest["chunks_per_source"]) == {"RedPajamaWikipedia"}
    tokens = corpus.read_corpus(out / "manifest.json")
    assert tokens.shape == (manifest["chunks"], 128) and tokens.dtype == np.int32
    assert manifest["tokens"] == tokens.size
    first = chunks[0]
    doc_text = list(pydoc_data.topics.topics.values())[first["doc"]]
    assert tok.decode(tokens[0]).strip()[:40] in doc_text


def test_tampered_shard_is_refused_naming_the_file(sharded, tmp_path):
    out, manifest, _, _ = sharded
    shard = manifest["shards"][0]["file"]
    copy = tmp_path / "c"
    (copy / "shards").mkdir(parents=True)
    (copy / "manifest.json").write_text((out / "manifest.json").read_text())
    data = (out / "shards" / shard).read_bytes()
    (copy / "shards" / shard).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match=f"shard .*{shard} does not match"):
        corpus.read_shard(copy / "manifest.json", shard)


def test_validation_refuses_bad_chunks():
    good = np.zeros((2, 8), dtype=np.int32)
    corpus.validate_tokens(good, 8, 100, None, "x")
    with pytest.raises(UserError, match="not all 8 tokens"):
        corpus.validate_tokens(np.zeros((2, 7), np.int32), 8, 100, None, "x")
    with pytest.raises(UserError, match="outside the vocabulary"):
        corpus.validate_tokens(good + 100, 8, 100, None, "x")
    with pytest.raises(UserError, match="padding token 0"):
        corpus.validate_tokens(good, 8, 100, 0, "x")


def test_empty_corpus_and_missing_source_are_clear_errors(topics_jsonl, smollm2, tmp_path):
    _, tok, _ = smollm2
    chunks, _ = corpus.chunk_documents(
        corpus.read_records(str(topics_jsonl)), tok, 128, ["RedPajamaArXiv"]
    )
    with pytest.raises(UserError, match="empty after filtering"):
        corpus.write_shards(chunks, tmp_path / "s", tmp_path / "m.json", 128, len(tok), None, 8, {})
    with pytest.raises(UserError, match="does not exist"):
        list(corpus.read_records(str(tmp_path / "nope.jsonl")))


def test_unreachable_hub_says_how_to_use_local_files():
    with pytest.raises(UserError, match="point corpus.source at local"):
        next(corpus.read_records("DKYoon/SlimPajama-6B"))


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="no shared sample beside this checkout")
def test_shared_sample_drops_github_records(smollm2):
    _, tok, _ = smollm2
    chunks, counts = corpus.chunk_documents(
        corpus.read_records(str(SHARED_SAMPLE)), tok, 512, corpus.DEFAULT_KEEP, max_chunks=50
    )
    assert counts["documents_dropped"] == {"RedPajamaGithub": 6} or len(chunks) == 50
    assert len(chunks) == 50 and all(c["source"] == "RedPajamaWikipedia" for c in chunks)


def test_local_sources_are_counted_to_the_end_past_max_chunks(topics_jsonl, smollm2):
    _, tok, _ = smollm2
    records = lambda: corpus.read_records(str(topics_jsonl))  # noqa: E731
    _, early = corpus.chunk_documents(records(), tok, 128, corpus.DEFAULT_KEEP, 2, batch_size=4)
    chunks, full = corpus.chunk_documents(
        records(), tok, 128, corpus.DEFAULT_KEEP, 2, batch_size=4, scan_all=True
    )
    assert len(chunks) == 2 and not early["read_every_record"] and full["read_every_record"]
    assert early["documents_dropped"]["RedPajamaGithub"] < 16
    assert full["documents_dropped"] == {"RedPajamaGithub": 16}
    kept = sum(full["documents_kept"].values()) + sum(full["documents_unused"].values())
    assert kept == len(pydoc_data.topics.topics) - 16
