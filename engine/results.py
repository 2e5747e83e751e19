"""The results dataset: one Parquet row per input, written in shards that appear atomically.

A shard is written in the run directory's staging folder, read back whole, checksummed, and only then renamed into
results/, so results/ only ever holds whole shards; the run directory's journal (engine.journal) records each one.
Shard names carry the attempt that wrote them and a counter or random token, never listing positions, so a later
run can never write a shard over an earlier one.

`path` holds each input's key as text. File names the OS allows need not be valid UTF-8 (Python carries their
undecodable bytes as surrogates); such a byte is written as `\\xNN` and a backslash as `\\\\`, so the column
is always valid UTF-8 and `path_key` turns it back into the exact name.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.pipeline import LoadedBatch

RESULTS_DIR = "results"
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
BASE_KEY = b"gradcam.base"  # Parquet key-value metadata: the directory relative paths in this shard start from
RUN_KEY = b"gradcam.run"  # and the digest of the run's fingerprint (engine.rundir): only its own run adopts a stray
METHODS_KEY = b"gradcam.methods"  # and the artifact's CAM methods, comma-separated: `cam` holds the first one's map

SCHEMA = pa.schema([
    ("path", pa.string()),
    ("status", pa.string()),             # "ok" | "error"
    ("error", pa.string()),              # null when ok
    ("width", pa.int32()),               # original size, after EXIF orientation
    ("height", pa.int32()),
    ("predicted_class", pa.int32()),
    ("predicted_label", pa.string()),
    ("predicted_score", pa.float32()),
    ("target_class", pa.int32()),
    ("target_score", pa.float32()),
    ("cam", pa.list_(pa.float32())),     # row-major [cam_height, cam_width]
    ("cam_height", pa.int32()),
    ("cam_width", pa.int32()),
])



def method_columns(methods: Sequence[str]) -> list[str]:
    """One list<float> column per CAM method, `cam_<method>` in the artifact's order, when it has more than one; with
    one, `cam` is that method's map and a copy would only double the bytes of every row."""
    return [f"cam_{m}" for m in methods] if len(methods) > 1 else []


def results_schema(methods: Sequence[str] = ()) -> pa.Schema:
    """The results' schema for an artifact with these CAM methods: SCHEMA, then the method columns; the methods are
    named in its metadata too, so a shard says which map `cam` holds even when it is the only one."""
    schema = SCHEMA
    for name in method_columns(methods):
        schema = schema.append(pa.field(name, pa.list_(pa.float32())))  # row-major [cam_height, cam_width]
    return schema.with_metadata({METHODS_KEY: ",".join(methods).encode()}) if methods else schema


# Columns with few distinct values. Dictionary-encoding the others (unique paths, float scores and CAM values) saves
# nothing and makes the writer's memory grow with the shard: about 16 kB per row for a 16x16 CAM.
DICTIONARY_COLUMNS = ["status", "error", "width", "height", "predicted_class", "predicted_label", "target_class",
                      "cam_height", "cam_width"]


_ESCAPED = re.compile(r"\\(\\|x([89a-f][0-9a-f])|u(d[89a-f][0-9a-f]{2}))")


def path_text(key: str) -> str:
    """An input's key as the results' `path`: valid UTF-8 whatever bytes the file name holds, and reversible.

    An undecodable byte NN (Python's surrogate U+DCNN) becomes `\\xNN`, any other lone surrogate `\\uDXXX`, and a
    backslash `\\\\`; every other character is kept. Escaping the backslash is what makes the mapping one-to-one.
    """
    if key.isascii() and "\\" not in key:
        return key
    out = []
    for ch in key:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xdc00:02x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def path_key(text: str) -> str:
    """The inverse of path_text: the exact key (file name bytes as Python holds them) of a results `path`."""
    if "\\" not in text:
        return text

    def unescape(match: re.Match[str]) -> str:
        if match.group(2):
            return chr(0xdc00 + int(match.group(2), 16))
        if match.group(3):
            return chr(int(match.group(3), 16))
        return "\\"

    return _ESCAPED.sub(unescape, text)


def ok_rows(paths: list[str], sizes: list[tuple[int, int]], outputs: dict[str, np.ndarray],
            labels: list[str], methods: Sequence[str] = ()) -> dict[str, list[Any]]:
    """Columns for a batch of successful images, from the engine's outputs."""
    predictions = outputs[C.PREDICTIONS]
    top = predictions.argmax(axis=1)
    cams = outputs[C.CAM]
    n, h, w = cams.shape
    per_method = {name: list(outputs[C.CAMS][:, i].reshape(n, h * w).astype(np.float32))
                  for i, name in enumerate(method_columns(methods))}
    return {
        "path": [path_text(p) for p in paths], "status": ["ok"] * n, "error": [None] * n,
        "width": [s[0] for s in sizes], "height": [s[1] for s in sizes],
        "predicted_class": top.astype(np.int32).tolist(),
        "predicted_label": [labels[i] if 0 <= i < len(labels) else str(i) for i in top.tolist()],
        "predicted_score": predictions[np.arange(n), top].astype(np.float32).tolist(),
        "target_class": outputs[C.TARGET_CLASS].astype(np.int32).tolist(),
        "target_score": outputs[C.TARGET_SCORE].astype(np.float32).tolist(),
        "cam": list(cams.reshape(n, h * w).astype(np.float32)),
        "cam_height": [h] * n, "cam_width": [w] * n, **per_method,
    }


def error_row(path: str, message: str) -> dict[str, list[Any]]:
    """Columns for one input that produced no result, with the reason."""
    row: dict[str, list[Any]] = {name: [None] for name in SCHEMA.names}
    row.update(path=[path_text(path)], status=["error"], error=[message])
    return row


def batch_rows(batch: LoadedBatch, outputs: dict[str, np.ndarray] | None, labels: list[str],
               methods: Sequence[str] = ()) -> dict[str, list[Any]]:
    """Rows in input order: ok rows from the outputs, error rows where reading or decoding failed."""
    good = batch.good
    ok_columns = ok_rows([x.key for x in good], [(x.image.width, x.image.height) for x in good], outputs,
                         labels, methods) if good and outputs is not None else None
    parts: list[dict[str, list[Any]]] = []
    position = 0
    for x in batch.loaded:
        if x.image is None:
            parts.append(error_row(x.key, f"{path_text(x.key)}: {x.error}"))
        else:
            parts.append({k: v[position:position + 1] for k, v in ok_columns.items()})  # type: ignore[union-attr]
            position += 1
    return concat(parts)


def to_table(columns: dict[str, list[Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """Columns -> a table with the results schema (each CAM list column one contiguous float32 buffer); a column
    the rows lack, such as a method column of a shard of error rows only, is all null."""
    arrays = []
    for field in schema:
        values = columns.get(field.name, [None] * len(columns["path"]))
        if pa.types.is_list(field.type):
            arrays.append(_cam_array(values))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _cam_array(values: list[np.ndarray | None]) -> pa.Array:
    lengths = [0 if v is None else len(v) for v in values]
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([v for v in values if v is not None]) if any(lengths) else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float32)), mask=mask)


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard as the journal records it: what a later run checks before trusting its rows."""

    name: str
    rows: int
    sha256: str
    bytes: int


def shard_name(attempt: str, token: str) -> str:
    """A shard's file name: the attempt that wrote it and a token unique within that attempt."""
    return f"{SHARD_PREFIX}{attempt}-{token}{SHARD_SUFFIX}"


def new_token() -> str:
    """A token no other writer task picks (Ray's writers run in parallel and cannot share a counter)."""
    return uuid.uuid4().hex[:12]


def is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


def fsync_path(path: Path) -> None:
    """Flush a file or directory to stable storage (on NFS: to the server), so a rename commits written bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_shard(staging_dir: Path, table: pa.Table, name: str, base: str, run: str = "") -> tuple[Path, ShardRecord]:
    """Write a shard in the staging folder, tagged with the run's digest, flush it, read it back whole and checksum
    it; OSError on a full or read-only disk (the temporary file is removed first)."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir / f"{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), BASE_KEY: path_text(base).encode(),
                                               RUN_KEY: run.encode()})
        pq.write_table(table, tmp, compression="zstd", use_dictionary=DICTIONARY_COLUMNS, write_page_checksum=True)
        fsync_path(tmp)
        data = tmp.read_bytes()  # read once: the bytes checksummed are the bytes that read back
        back = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        if back.num_rows != table.num_rows:
            raise OSError(0, f"shard read back with {back.num_rows} of {table.num_rows} rows")
        return tmp, ShardRecord(name, table.num_rows, hashlib.sha256(data).hexdigest(), len(data))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_shard(tmp: Path, results_dir: Path, name: str) -> Path:
    """Rename a staged shard into results/; never over an existing file."""
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / name
    if final.exists():
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{final}: a shard of that name is already committed")
    try:
        os.replace(tmp, final)
        fsync_path(results_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def read_shard(source: Path | bytes, columns: list[str] | None = None) -> pa.Table:
    """A shard (its file, or its bytes already read) read whole, every page's checksum verified; raises on any
    damage."""
    return pq.read_table(pa.BufferReader(source) if isinstance(source, bytes) else source, columns=columns,
                         page_checksum_verification=True)


def shard_base(path: Path) -> str:
    """The directory the shard's relative paths start from (the writer's working directory)."""
    return base_of(pq.read_schema(path))


def base_of(schema: pa.Schema) -> str:
    """shard_base from a shard's schema (a table read from it keeps the file's metadata)."""
    return path_key((schema.metadata or {}).get(BASE_KEY, b"").decode())


def concat(columns: Iterable[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Append column dicts in order; a column some parts lack (error rows have no method columns) is None there."""
    parts = list(columns)
    names = list(dict.fromkeys([*SCHEMA.names, *(name for part in parts for name in part)]))
    out: dict[str, list[Any]] = {name: [] for name in names}
    for part in parts:
        rows = len(part["path"])
        for name in names:
            out[name].extend(part.get(name, [None] * rows))
    return out
