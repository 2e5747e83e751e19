"""The per-batch stages of a Ray run: decode, infer, write. Plain functions and one class, no Ray import.

Each stage reuses the local engine's own step (engine.pipeline.load, engine.session.GradCAMSession, the row builder
and shard writer of engine.results, engine.overlay's writer), so a row written here is the row the local runner
writes.
Ray Data calls them in its tasks and actors; they can equally be called on plain dicts, which is how they are tested.

Columns between the stages: `path` (the input's key as the results write it, engine.results.path_text: valid UTF-8
for any file name, turned back into the exact name where a file is read), `_kind` (image or tar member) and `_index`
(its position in the listing: orders a shard's rows, selects overlays); after decoding also `images`, `ok`, `error`,
`width`, `height`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.decode import DecodedImage
from gradcam_engine.engine.errors import RunError, UserError
from gradcam_engine.engine.inputs import InputItem
from gradcam_engine.engine.overlay import write_overlays
from gradcam_engine.engine.pipeline import Loaded, LoadedBatch, load
from gradcam_engine.engine.results import (batch_rows, method_columns, new_token, path_key, publish_shard,
                                           results_schema, shard_name, stage_shard, to_table)
from gradcam_engine.engine.runlock import lock_token_matches
from gradcam_engine.engine.session import GradCAMSession, SessionOptions
from gradcam_engine.engine.storage import is_uri

KIND = "_kind"
INDEX = "_index"
FAILURE = "failure"  # a writer task's result: why it committed nothing ("" when it committed its shard)
OK = "ok"
ERROR = "error"
WIDTH = "width"
HEIGHT = "height"

Columns = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What every decode (and overlay re-decode) needs, fixed for the run and shipped to each task."""

    size: tuple[int, int]   # the model's (height, width)
    max_bytes: int
    max_pixels: int
    base: str               # the driver's working directory: relative keys are read from there, not the worker's


def load_key(key: str, kind: str, spec: DecodeSpec, keep_original: bool) -> Loaded:
    """engine.pipeline.load for one key (the exact name, not its results text), read relative to the driver's
    directory but reported under the key itself."""
    readable = key if is_uri(key) or os.path.isabs(key) else os.path.join(spec.base, key)  # a URI names its store
    loaded = load(InputItem(readable, kind), spec.size, spec.max_bytes, spec.max_pixels, keep_original)
    return dataclasses.replace(loaded, key=key)


def decode_batch(batch: Columns, spec: DecodeSpec) -> Columns:
    """Decode task: pixels for the inputs that decode, an error (and zero pixels) for those that do not."""
    texts, kinds = [str(k) for k in batch["path"]], [str(k) for k in batch[KIND]]
    loaded = [load_key(path_key(text), kind, spec, keep_original=False) for text, kind in zip(texts, kinds)]
    images = np.zeros((len(loaded), *spec.size, 3), np.uint8)
    for i, x in enumerate(loaded):
        if x.image is not None:
            images[i] = x.image.pixels
    return {
        "path": np.array(texts, dtype=object), KIND: np.array(kinds, dtype=object),
        INDEX: np.asarray(batch[INDEX], np.int64), C.IMAGES: images,
        OK: np.array([x.image is not None for x in loaded], bool),
        ERROR: np.array([x.error or "" for x in loaded], dtype=object),
        WIDTH: np.array([x.image.width if x.image else 0 for x in loaded], np.int32),
        HEIGHT: np.array([x.image.height if x.image else 0 for x in loaded], np.int32),
    }


def as_loaded(batch: Columns) -> list[Loaded]:
    """Decoded columns back into the local engine's Loaded records, so its row builder can be reused as is."""
    return [Loaded(path_key(str(text)), image=DecodedImage(batch[C.IMAGES][i], int(batch[WIDTH][i]),
                                                          int(batch[HEIGHT][i])))
            if batch[OK][i] else Loaded(path_key(str(text)), error=str(batch[ERROR][i]))
            for i, text in enumerate(batch["path"])]


def with_position(table: pa.Table, batch: Columns) -> pa.Table:
    """Result rows plus the columns the writer needs (listing position, input kind), dropped before writing."""
    return (table.append_column(INDEX, pa.array(np.asarray(batch[INDEX], np.int64), pa.int64()))
            .append_column(KIND, pa.array([str(k) for k in batch[KIND]], pa.string())))


class GradCAMActor:
    """One model replica: the artifact is loaded once per actor, then each decoded batch becomes result rows."""

    def __init__(self, artifact: str, options: SessionOptions, class_index: int):
        self.session = GradCAMSession(artifact, options)
        self.labels = self.session.artifact.class_names
        self.methods = self.session.artifact.methods
        self.class_index = class_index

    def __call__(self, batch: Columns) -> pa.Table:
        ok = np.asarray(batch[OK], bool)
        outputs = None
        if ok.any():
            images = np.ascontiguousarray(batch[C.IMAGES][ok])
            outputs = self.session({C.IMAGES: images,
                                    C.CLASS_INDEX: np.full(len(images), self.class_index, np.int32)})
        rows = batch_rows(LoadedBatch(as_loaded(batch)), outputs, self.labels, self.methods)
        return with_position(to_table(rows, results_schema(self.methods)), batch)


def probe_replica(artifact: str, options: SessionOptions) -> tuple[str, str, str]:
    """Build one replica where replicas run and report (device, precision, precision note): the fingerprint needs
    them up front."""
    session = GradCAMSession(artifact, options)
    return session.device, session.precision, session.precision_note


def overlay_column(methods: tuple[str, ...], index: int) -> str:
    """The results column holding the map overlays show: `cam` for the first method, else its own column."""
    return "cam" if index == 0 else method_columns(methods)[index]


@dataclasses.dataclass(frozen=True)
class CommitSpec:
    """Where and under which lock a writer task commits: a shard is renamed into results/ only while the driver
    that started this attempt still holds the run directory's lock."""

    run_dir: str
    results_dir: str
    staging_dir: str
    overlay_dir: str
    attempt: str
    lock_token: str
    run_digest: str = ""  # the digest of the run's fingerprint each shard carries (engine.rundir.run_digest)


def write_batch(table: pa.Table, commit: CommitSpec, overlay_limit: int, spec: DecodeSpec,
                methods: tuple[str, ...] = (), overlay_index: int = 0) -> Columns:
    """Writer task: overlays, then the rows as one shard, written, read back, checksummed and renamed into results/,
    so a committed row has its overlay; the driver journals the record this returns. A failure the user can fix
    (a lost lock, a full or read-only disk) is returned in FAILURE for the driver to raise: Ray Data replaces an
    exception raised here by one that no longer carries it."""
    try:
        return _write(table, commit, overlay_limit, spec, methods, overlay_index)
    except UserError as e:
        return _failed(str(e))
    except OSError as e:
        return _failed(f"{commit.run_dir}: a writer task cannot commit a shard ({e.strerror or e}: "
                       f"{e.filename or commit.results_dir}); nothing committed is lost: fix the cause and rerun the "
                       "same command")


def _failed(message: str) -> Columns:
    nothing = np.zeros(1, np.int64)
    return {"shard": np.array([""], dtype=object), "rows": nothing, "sha256": np.array([""], dtype=object),
            "bytes": nothing, "ok": nothing, FAILURE: np.array([message], dtype=object)}


def _write(table: pa.Table, commit: CommitSpec, overlay_limit: int, spec: DecodeSpec, methods: tuple[str, ...],
           overlay_index: int) -> Columns:
    table = table.sort_by(INDEX)
    index = table.column(INDEX).to_numpy()
    if overlay_limit and int(index[0]) < overlay_limit:
        write_table_overlays(table.filter(pc.less(table.column(INDEX), overlay_limit)),
                             Path(commit.overlay_dir), spec, overlay_column(methods, overlay_index))
    schema = results_schema(methods)
    name = shard_name(commit.attempt, new_token())
    tmp, record = stage_shard(Path(commit.staging_dir), table.select(schema.names).cast(schema), name, spec.base,
                              commit.run_digest)
    if not lock_token_matches(Path(commit.run_dir), commit.lock_token):  # the driver is gone or was replaced
        tmp.unlink(missing_ok=True)
        raise RunError(f"{commit.run_dir}: the run lock was taken over by another run; this run stops without "
                       "committing more")
    publish_shard(tmp, Path(commit.results_dir), name)
    statuses = table.column("status").to_pylist()
    return {"shard": np.array([name], dtype=object), "rows": np.array([record.rows], np.int64),
            "sha256": np.array([record.sha256], dtype=object), "bytes": np.array([record.bytes], np.int64),
            "ok": np.array([statuses.count("ok")], np.int64), FAILURE: np.array([""], dtype=object)}


def write_table_overlays(table: pa.Table, folder: Path, spec: DecodeSpec, column: str = "cam") -> None:
    """Overlays for a table's ok rows, of the map in `column`; the full-size image is re-read here, so it never
    crosses the object store."""
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    if ok.num_rows == 0:
        return
    h, w = int(ok.column("cam_height")[0].as_py()), int(ok.column("cam_width")[0].as_py())
    cams = ok.column(column).combine_chunks().flatten().to_numpy().reshape(ok.num_rows, h, w)
    keys, kinds = [path_key(t) for t in ok.column("path").to_pylist()], ok.column(KIND).to_pylist()
    loaded = [load_key(key, kind, spec, keep_original=True) for key, kind in zip(keys, kinds)]
    kept = [i for i, x in enumerate(loaded) if x.image is not None]  # an input changed since decoding gets none
    write_overlays(folder, LoadedBatch([loaded[i] for i in kept]), {C.CAM: cams[kept]})
