"""The results dataset: one Parquet row per input, written in shards that appear atomically.

A shard is written under a temporary name and renamed into place, so a reader (or a resumed run) only ever sees
whole shards; anything half-written by a killed process is a `.tmp` file that the next run deletes.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.pipeline import LoadedBatch

RESULTS_DIR = "results"

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
    """The results' schema for an artifact with these CAM methods: SCHEMA, then the method columns."""
    schema = SCHEMA
    for name in method_columns(methods):
        schema = schema.append(pa.field(name, pa.list_(pa.float32())))  # row-major [cam_height, cam_width]
    return schema


# Columns with few distinct values. Dictionary-encoding the others (unique paths, float scores and CAM values) saves
# nothing and makes the writer's memory grow with the shard: about 16 kB per row for a 16x16 CAM.
DICTIONARY_COLUMNS = ["status", "error", "width", "height", "predicted_class", "predicted_label", "target_class",
                      "cam_height", "cam_width"]


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
        "path": paths, "status": ["ok"] * n, "error": [None] * n,
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
    row.update(path=[path], status=["error"], error=[message])
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
            parts.append(error_row(x.key, f"{x.key}: {x.error}"))
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


def write_shard(results_dir: Path, table: pa.Table, first: int, last: int) -> Path:
    """Write rows for inputs first..last as one shard: temporary name, then an atomic rename."""
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / f"part-{first:09d}-{last:09d}.parquet"
    tmp = results_dir / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp, compression="zstd", use_dictionary=DICTIONARY_COLUMNS)
    os.replace(tmp, final)
    return final


def clean_partial(results_dir: Path) -> int:
    """Delete what a killed run left half-written; returns how many files."""
    if not results_dir.is_dir():
        return 0
    stale = list(results_dir.glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def done_paths(results_dir: Path) -> set[str]:
    """The inputs that already have a row, read from the committed shards' path column only."""
    if not results_dir.is_dir():
        return set()
    done: set[str] = set()
    for shard in sorted(results_dir.glob("part-*.parquet")):
        done.update(pq.read_table(shard, columns=["path"]).column("path").to_pylist())
    return done


def count_rows(results_dir: Path) -> dict[str, int]:
    """ok / error counts over every committed shard."""
    counts = {"ok": 0, "error": 0}
    for shard in sorted(results_dir.glob("part-*.parquet")):
        for status in pq.read_table(shard, columns=["status"]).column("status").to_pylist():
            counts[status] = counts.get(status, 0) + 1
    return counts


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
