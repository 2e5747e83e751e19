"""A finished (or interrupted) run directory, read for analysis: run.json, the artifact's manifest, the CAM methods
and their result columns, and the results as Parquet batches with each CAM as an array.

CAM columns: `cam` holds the first method; a run with several methods adds one `cam_<method>` list column per
method, in the manifest's `methods` order. Readers evaluate every CAM column present, so a new method needs no change
here.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.inputs import IMAGE, TAR_MEMBER, InputItem, split_tar_key
from gradcam_engine.engine.overlay import OVERLAY_DIR
from gradcam_engine.engine.results import RESULTS_DIR, path_key, shard_base
from gradcam_engine.engine.rundir import RUN_JSON
from gradcam_engine.engine.storage import is_uri

DEFAULT_METHOD = "gradcam"


def cam_columns(schema: pa.Schema, methods: list[str]) -> dict[str, str]:
    """method -> the results column holding its CAM, in output order: `cam_<method>` where present, `cam` for the
    first method otherwise; a `cam_<name>` column no method names is evaluated too, under that name."""
    lists = [f.name for f in schema if f.name == C.CAM or (f.name.startswith(f"{C.CAM}_") and
                                                             pa.types.is_list(f.type))]
    found: dict[str, str] = {}
    for i, method in enumerate(methods):
        if f"{C.CAM}_{method}" in lists:
            found[method] = f"{C.CAM}_{method}"
        elif i == 0 and C.CAM in lists:
            found[method] = C.CAM
    for name in lists:
        if name != C.CAM and name[len(C.CAM) + 1:] not in found:
            found[name[len(C.CAM) + 1:]] = name
    return found


def item_for(key: str) -> InputItem:
    """The input item an exact input key names (a tar member or an image)."""
    try:
        split_tar_key(key)
    except ValueError:
        return InputItem(key, IMAGE)
    return InputItem(key, TAR_MEMBER)


class RunView:
    """Read access to one run directory; nothing here writes."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.results_dir = self.root / RESULTS_DIR
        self.overlays_dir = self.root / OVERLAY_DIR
        run_json = self.root / RUN_JSON
        if not run_json.is_file():
            raise RunError(f"{self.root}: not a run directory (no {RUN_JSON}); make one with `gradcam run`")
        try:
            self.info: dict[str, Any] = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{run_json}: unreadable ({e})") from None
        if not any(self.results_dir.glob("part-*.parquet")):
            raise RunError(f"{self.results_dir}: no results yet; run `gradcam run` to completion first")

    @cached_property
    def dataset(self) -> ds.Dataset:
        """Every committed results shard as one dataset (half-written `.tmp` files are hidden by their dot)."""
        return ds.dataset(str(self.results_dir), format="parquet")

    @cached_property
    def _bases(self) -> dict[str, str]:
        """Shard file -> the directory its relative paths start from (the writing run's working directory)."""
        return {str(p): shard_base(p) for p in self.results_dir.glob("part-*.parquet")}

    @cached_property
    def _base_of_path(self) -> dict[str, str]:
        """Results path -> its shard's base, for runs whose shards were written from different directories."""
        found: dict[str, str] = {}
        for fragment in self.dataset.get_fragments():
            base = self._bases.get(fragment.path, "")
            for path in fragment.to_table(columns=["path"]).column("path").to_pylist():
                found[path] = base
        return found

    @cached_property
    def _common_base(self) -> str | None:
        """The one base all shards share (the usual case), None when they differ or there are none."""
        bases = set(self._bases.values())
        return bases.pop() if len(bases) == 1 else None

    def item(self, path: str) -> InputItem:
        """The input a results `path` names, readable again as the run read it: the escape of undecodable bytes
        undone (engine.results.path_key), and a relative path joined to the directory the run wrote it from."""
        key = path_key(path)
        location = key.split("::", 1)[0]
        if not is_uri(location) and not os.path.isabs(location):
            base = self._common_base
            base = self._base_of_path.get(path, "") if base is None else base
            key = os.path.join(base, key) if base else key
        return item_for(key)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.info.get("fingerprint") or {})

    @property
    def artifact_root(self) -> Path:
        return Path(str(self.info.get("artifact", "")))

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        """The artifact's manifest when the artifact is still where the run found it (not verified here)."""
        try:
            return json.loads((self.artifact_root / C.MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    @cached_property
    def class_names(self) -> list[str]:
        """The model's class names: the manifest's, else the labels the results carry (index -> label)."""
        manifest = self.manifest
        if manifest and manifest.get("class_names"):
            return list(manifest["class_names"])
        if manifest and manifest.get("num_classes"):
            return [str(i) for i in range(int(manifest["num_classes"]))]
        table = self.dataset.to_table(columns=["predicted_class", "predicted_label"],
                                      filter=ds.field("status") == "ok")
        pairs = dict(zip(table.column("predicted_class").to_pylist(), table.column("predicted_label").to_pylist()))
        count = max(pairs) + 1 if pairs else 0
        return [str(pairs.get(i, i)) for i in range(count)]

    @cached_property
    def cam_columns(self) -> dict[str, str]:
        """method -> CAM column, in output order; methods named by run.json or the manifest, else Grad-CAM alone."""
        listed = self.info.get("methods") or (self.manifest or {}).get("methods") or [DEFAULT_METHOD]
        return cam_columns(self.dataset.schema, [str(m) for m in listed])

    @property
    def methods(self) -> list[str]:
        return list(self.cam_columns)

    def batches(self, columns: list[str], filter: ds.Expression | None = None,
                batch_size: int = 8192) -> Iterator[pa.Table]:
        """Results in bounded batches (as tables), shard by shard in name order."""
        scanner = self.dataset.scanner(columns=columns, filter=filter, batch_size=batch_size)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield pa.Table.from_batches([batch])


def cam_array(table: pa.Table, column: str) -> np.ndarray:
    """A CAM list column -> float32 [n, h, w]; rows without a CAM (errors) are all zero."""
    n = table.num_rows
    heights = table.column("cam_height").drop_null()
    if not len(heights):
        return np.zeros((n, 1, 1), np.float32)
    h, w = int(heights[0].as_py()), int(table.column("cam_width").drop_null()[0].as_py())
    cams = np.zeros((n, h * w), np.float32)
    chunked = table.column(column)
    array = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
    has = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False))
    lengths = np.asarray(array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
    if (lengths[has] != h * w).any():
        raise RunError(f"results column {column}: CAMs of different sizes in one run; the results are damaged")
    values = np.asarray(array.flatten().to_numpy(zero_copy_only=False), np.float32)
    cams[has] = values.reshape(-1, h * w)
    return cams.reshape(n, h, w)
