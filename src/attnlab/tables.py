"""Parquet tables: written atomically with pyarrow (zstd), read with polars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from attnlab.errors import UserError

META_KEY = b"attnlab"


def write(rows: list[dict] | pa.Table, path: str | Path, meta: dict | None = None) -> None:
    """Write rows to ``path`` as Parquet; ``meta`` (JSON-able) goes into the file metadata.

    The file appears under its name only when complete: a killed job leaves a ``.tmp``
    file that no rule takes as an output.
    """
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    if meta is not None:
        md = dict(table.schema.metadata or {})
        md[META_KEY] = json.dumps(meta, sort_keys=True).encode()
        table = table.replace_schema_metadata(md)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a table; a missing, truncated or foreign file raises a one-line UserError."""
    try:
        df = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise UserError(f"cannot read table {path}: {str(e).splitlines()[0]}") from e
    missing = [c for c in columns or [] if c not in df.columns]
    if missing:
        raise UserError(f"table {path} lacks columns {missing}: written by an older version?")
    return df


def read_all(paths, columns: list[str] | None = None) -> pl.DataFrame:
    """Several tables as one (columns missing from some come back null); with ``columns``,
    each must hold them and only they are kept."""
    frames = [read(p, columns) for p in paths]
    if columns is not None:
        frames = [f.select(columns) for f in frames]
    return pl.concat(frames, how="diagonal_relaxed")


def read_folder(folder: str | Path, columns: list[str]) -> tuple[pl.DataFrame, dict]:
    """``columns`` of every table in a folder (in name order), and the first one's metadata."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise UserError(f"no tables in {folder}")
    return read_all(files, columns), meta(files[0])


def meta(path: str | Path) -> dict:
    """The metadata that :func:`write` stored with a table."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` to ``path`` as indented JSON with sorted keys, atomically as
    :func:`write` does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
