"""Where `evaluate` writes: RUN_DIR/metrics/ (Parquet shards, one row per input and CAM method) and
RUN_DIR/metrics.json (what was asked, the fingerprint of it, and the figures).

As with results/, a shard is written under a hidden temporary name and renamed into place, so a reader or a resumed
evaluation only ever sees whole shards, and what is done is read back from them. Every input's rows (one per method)
go into the same shard, so an input is either done for every method or for none.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.rundir import write_json

METRICS_DIR = "metrics"
METRICS_JSON = "metrics.json"

_FLOATS = pa.list_(pa.float32())
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("method", pa.string()),
    ("status", pa.string()),             # the run's: ok | error
    ("error", pa.string()),              # the run's error, or why faithfulness could not be measured
    ("width", pa.int32()),               # original size, after EXIF orientation
    ("height", pa.int32()),
    ("predicted_class", pa.int32()),
    ("predicted_label", pa.string()),
    ("predicted_score", pa.float32()),
    ("target_class", pa.int32()),        # the class the CAM explains
    ("label", pa.int32()),               # ground truth class index; null: no label
    ("label_name", pa.string()),
    ("correct", pa.bool_()),             # predicted_class == label; null without a label
    ("boxes", _FLOATS),                  # ground truth boxes, x0, y0, x1, y1 flattened; null: no boxes
    ("pointing_hit", pa.bool_()),        # the CAM's peak cell centre inside a box
    ("energy", pa.float32()),            # share of the upsampled CAM's mass inside the boxes
    ("iou", pa.float32()),               # IoU of the upsampled CAM >= 0.5 with the union of the boxes
    ("score", pa.float32()),             # the target's predictions value on the image, re-read and re-decoded
    ("masked_score", pa.float32()),      # ... on the image times its CAM
    ("drop", pa.float32()),              # max(0, score - masked_score) / score
    ("increase", pa.bool_()),            # masked_score > score
    ("deletion_auc", pa.float32()),
    ("insertion_auc", pa.float32()),
    ("deletion_curve", _FLOATS),         # K + 1 scores, from the image to the baseline
    ("insertion_curve", _FLOATS),        # K + 1 scores, from the baseline to the image
])

DICTIONARY_COLUMNS = ["method", "status", "error", "width", "height", "predicted_class", "predicted_label",
                      "target_class", "label", "label_name"]


class MetricsStore:
    """The metrics of one run directory: refused or prepared before any work, then filled shard by shard."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.dir = self.root / METRICS_DIR
        self.json = self.root / METRICS_JSON
        self.info: dict[str, Any] = {}

    def read_json(self) -> dict[str, Any] | None:
        """metrics.json as written last, or None."""
        try:
            return json.loads(self.json.read_text())
        except (OSError, ValueError):
            return None

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool, results_shards: dict[str, int]) -> None:
        """Check that earlier metrics were asked for the same way, of the same results (else refuse, unless
        overwriting); delete what a killed evaluation left half-written.

        `results_shards` (name -> bytes) identifies the results: a run may have grown since (new shards: scored
        now), but a shard replaced or gone means the run was redone, and its old metrics would be stale.
        """
        previous = self.read_json()
        replaced = sorted(name for name, size in ((previous or {}).get("results_shards") or {}).items()
                          if results_shards.get(name) != size)
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.json.unlink(missing_ok=True)
        elif previous is not None and previous.get("fingerprint") != fingerprint:
            old = previous.get("fingerprint") or {}
            changed = sorted(k for k in set(fingerprint) | set(old) if old.get(k) != fingerprint.get(k))
            raise RunError(f"{self.root}: holds metrics evaluated with different {', '.join(changed)}; evaluate "
                           "with the same options to resume, or add --overwrite to replace them")
        elif replaced:
            raise RunError(f"{self.root}: the results changed since they were evaluated ({replaced[0]} "
                           f"{'and others ' if len(replaced) > 1 else ''}replaced or removed: the run was redone); "
                           "add --overwrite to evaluate again")
        elif previous is None and any(self.dir.glob("part-*.parquet")):
            raise RunError(f"{self.dir}: has metrics but no {METRICS_JSON}; add --overwrite to replace them")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def done_paths(self) -> set[str]:
        """Inputs that already have their rows, from the committed shards' path column only."""
        done: set[str] = set()
        for shard in sorted(self.dir.glob("part-*.parquet")):
            done.update(pq.read_table(shard, columns=["path"]).column("path").to_pylist())
        return done

    def start(self, fingerprint: dict[str, Any], options: dict[str, Any], **extra: Any) -> None:
        """metrics.json with status "running" before the first shard, so a killed evaluation is recognisable."""
        self.info = {"status": "running", "fingerprint": fingerprint, "options": options, **extra,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.json, self.info)

    def write(self, table: pa.Table) -> Path:
        """Commit one shard atomically; names sort by time of writing and never collide with an earlier one."""
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table.cast(SCHEMA), tmp, compression="zstd", use_dictionary=DICTIONARY_COLUMNS)
        final = self.dir / name
        tmp.replace(final)
        return final

    def dataset(self) -> ds.Dataset:
        return ds.dataset(str(self.dir), format="parquet", schema=SCHEMA)

    def finish(self, figures: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """metrics.json complete: the figures over every committed row (this evaluation's and earlier ones')."""
        self.info.update(status="complete", **extra, **figures, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(self.json, json_safe(self.info))
        return self.info


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: metrics.json stays strict JSON that every reader accepts."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
