"""`evaluate`: judge a run's CAMs at data-set scale, against labels and boxes, and by their faithfulness to the model.

    run's results/ ─▶ (labels, boxes matched by path) ─▶ box metrics per CAM method (pure numpy, Parquet only)
                   └▶ faithfulness: re-read and re-decode each image as the run did ─▶ perturb ─▶ the same artifact
                   ─▶ RUN_DIR/metrics/ (one row per input and method) ─▶ RUN_DIR/metrics.json (the figures)

Resumable like a run: what is done is read back from the committed metrics shards, so an interrupted evaluation
goes on where it stopped, a finished one adds nothing, and one over a run that has grown since scores the new rows.
Other options on the same run directory are refused unless overwriting.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_engine.engine.annotations import (Boxes, Labels, PathMatcher, file_digest, labels_from_folders,
                                               read_boxes, read_labels)
from gradcam_engine.engine.artifact import load_artifact
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.faithfulness import BASELINES, DEFAULT_STEPS, KINDS, measure, session_scorer
from gradcam_engine.engine.figures import figures
from gradcam_engine.engine.metrics import box_scores, curve_auc
from gradcam_engine.engine.metrics_store import METRICS_JSON, SCHEMA, MetricsStore
from gradcam_engine.engine.pipeline import load, ordered_map
from gradcam_engine.engine.progress import Progress
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.run_view import RunView, cam_array
from gradcam_engine.engine.session import GradCAMSession, SessionOptions

# The precision the faithfulness probe runs for the run's precision. A bf16 run is the fp32 graph with TensorFlow's
# oneDNN rewriting its products to bf16 as it runs (engine/bf16.py); ONNX Runtime has no bf16 kernels, so the probe
# scores that same fp32 graph without the rewrite. Every other precision has its own ONNX file and is probed as it ran.
PROBE_PRECISION = {"bf16": "fp32"}

RESULT_COLUMNS = ["path", "status", "error", "width", "height", "predicted_class", "predicted_label",
                  "predicted_score", "target_class", "cam_height", "cam_width"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything `gradcam evaluate` accepts."""

    run_dir: str
    labels: str | None = None              # CSV path,label
    labels_from_folders: bool = False      # the folder holding each image names its class
    boxes: str | None = None               # CSV path,x0,y0,x1,y1 or COCO JSON
    root: str | None = None                # relative paths in the files start here (default: the file's folder)
    methods: tuple[str, ...] = ()          # CAM methods to evaluate (box metrics and faithfulness); (): all the run's
    faithfulness: tuple[str, ...] = ()     # any of drop, deletion, insertion
    steps: int = DEFAULT_STEPS             # K of deletion / insertion
    baseline: str = "blur"                 # what deleted pixels become: blur | mean
    artifact: str | None = None            # default: the run's
    session: SessionOptions = field(default_factory=SessionOptions)  # device and threads (ONNX Runtime)
    batch_size: int = 32                   # images per forward pass, for faithfulness
    workers: int = 0                       # decode threads (faithfulness) or scoring threads; 0 = one per core
    shard_size: int = 0                    # inputs per metrics shard, the resume granularity; 0: 4096, or 256
                                           # when measuring faithfulness (minutes of work, not hours, to redo)
    overwrite: bool = False
    progress: bool | None = None

    def check(self) -> None:
        """Refuse option values that can only fail later."""
        if self.labels and self.labels_from_folders:
            raise RunError("--labels and --labels-from-folders: give one source of labels")
        unknown = [k for k in self.faithfulness if k not in KINDS]
        if unknown:
            raise RunError(f"--faithfulness {','.join(unknown)}: choose from {','.join(KINDS)}")
        if self.steps < 1:
            raise RunError("--steps must be at least 1")
        if self.baseline not in BASELINES:
            raise RunError(f"--baseline {self.baseline}: choose {', '.join(BASELINES)}")
        if self.batch_size < 1 or self.shard_size < 0:
            raise RunError("--batch-size must be at least 1 and --shard-size at least 0")
        if self.session.backend != "onnx":
            raise RunError("evaluate runs the artifact's ONNX graph; --backend must be onnx")


@dataclass
class GroundTruth:
    labels: Labels | None
    boxes: Boxes | None


@dataclass
class EvaluationSummary:
    """What an evaluation did and found; `info` is metrics.json as written."""

    run_dir: str
    evaluated: int
    already_done: int
    seconds: float
    info: dict[str, Any]

    def text(self) -> str:
        counts = self.info["counts"]
        probe = self.info.get("faithfulness_probe") or {}
        lines = [f"{counts['inputs']} inputs ({counts['ok']} ok, {counts['error']} errors); evaluated "
                 f"{self.evaluated} in {self.seconds:.1f} s" + (f" ({self.already_done} already done, resumed)"
                                                                 if self.already_done else "") + "."]
        if probe and probe["precision"] != probe["run_precision"]:
            lines.append(f"faithfulness: scored through the {probe['precision']} ONNX graph (the run was "
                         f"{probe['run_precision']}: {probe['why']})")
        classification = self.info.get("classification")
        if classification:
            lines.append(f"classification: accuracy {_pct(classification['accuracy'])} of {classification['images']} "
                         f"labelled ({counts['unlabelled']} without a label), macro precision "
                         f"{_pct(classification['macro_precision'])}, macro recall "
                         f"{_pct(classification['macro_recall'])}")
        for method, m in self.info["overall"].items():
            parts = []
            if "pointing_game" in m:
                parts.append(f"pointing game {_pct(m['pointing_game'])}, energy pointing game "
                             f"{_num(m['energy_pointing_game'])}, IoU@0.5 {_num(m['iou'])} over "
                             f"{m['images_with_boxes']} images with boxes ({counts['without_boxes']} without)")
            if "average_drop" in m:
                parts.append(f"Average Drop {_pct(m['average_drop'])}, Increase in Confidence "
                             f"{_pct(m['increase_in_confidence'])}")
            for kind in ("deletion", "insertion"):
                if f"{kind}_auc" in m:
                    parts.append(f"{kind} AUC {_num(m[f'{kind}_auc'])}")
            if parts:
                lines.append(f"{method}: " + "; ".join(parts))
        root = Path(self.run_dir)
        lines.append(f"Metrics: {root / 'metrics'}/ (Parquet, one row per input and method), {root / METRICS_JSON}.")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ground_truth(config: EvaluateConfig, keys: list[str], ok_keys: list[str], class_names: list[str],
                 locate: Callable[[str], str] = lambda key: key) -> GroundTruth:
    """Labels and boxes matched to the run's inputs (read and checked before anything is written); `locate` maps a
    results path to where the run read it."""
    matcher = PathMatcher(keys, locate) if (config.labels or config.boxes) else None
    labels = None
    if config.labels:
        labels = read_labels(config.labels, matcher, class_names, config.root)  # type: ignore[arg-type]
    elif config.labels_from_folders:
        labels = labels_from_folders(ok_keys, class_names)
    boxes = read_boxes(config.boxes, matcher, config.root) if config.boxes else None  # type: ignore[arg-type]
    return GroundTruth(labels=labels, boxes=boxes)


def chosen_columns(view: RunView, methods: tuple[str, ...]) -> dict[str, str]:
    """method -> CAM column for the methods asked for (all the run's when none), in the run's output order."""
    unknown = [m for m in methods if m not in view.cam_columns]
    if unknown:
        raise RunError(f"--methods {','.join(unknown)}: not a CAM method of this run; it has "
                       f"{','.join(view.methods)}")
    return {m: c for m, c in view.cam_columns.items() if not methods or m in methods}


def probe_precision(view: RunView) -> dict[str, str]:
    """Which precision of the artifact the faithfulness probe runs, for the run's own (recorded in metrics.json)."""
    ran = str(view.info.get("precision") or "auto")
    probed = PROBE_PRECISION.get(ran, ran)
    why = ("bf16 is the fp32 graph under TensorFlow's oneDNN bf16 rewrite, which ONNX Runtime cannot run"
           if ran == "bf16" else "the run's own precision")
    return {"backend": "onnx", "precision": probed, "run_precision": ran, "why": why}


def fingerprint(config: EvaluateConfig, view: RunView, truth: GroundTruth,
                methods: list[str]) -> dict[str, Any]:
    """What decides a metrics row: the run, the CAM methods, the ground truth files (by content) and the faithfulness
    options."""
    def source(path: str | None) -> dict[str, str] | None:
        return {"file": os.path.abspath(path), "sha256": file_digest(path)} if path else None

    curves = any(k in config.faithfulness for k in ("deletion", "insertion"))
    return {"run": view.fingerprint, "methods": methods,
            "labels": "folders" if config.labels_from_folders else source(config.labels),
            "boxes": source(config.boxes), "root": config.root,
            "faithfulness": sorted(config.faithfulness), "steps": config.steps if curves else None,
            "baseline": config.baseline if curves else None}


class FaithfulnessProbe:
    """Re-reads and re-decodes a batch of inputs as the run did and measures each method's CAM on them."""

    def __init__(self, config: EvaluateConfig, view: RunView):
        root = Path(config.artifact) if config.artifact else view.artifact_root
        artifact = load_artifact(root, verify=[])
        expected = view.fingerprint.get("artifact_sha256")
        if expected and artifact.checksum != expected:
            raise RunError(f"{root}: not the artifact this run used (manifest checksum differs); pass the run's "
                           "artifact with --artifact")
        self.precision = probe_precision(view)
        options = SessionOptions(**{**asdict(config.session), "backend": "onnx",
                                    "precision": self.precision["precision"]})
        self.session = GradCAMSession(artifact, options)
        self.precision["precision"] = self.session.precision
        self.size = artifact.input_size
        run_options = view.info.get("options") or {}
        self.max_bytes = int(run_options.get("max_bytes", RunConfig.max_bytes))
        self.max_pixels = int(run_options.get("max_pixels", RunConfig.max_pixels))
        self.config = config
        self.view = view
        self.workers = config.workers or max(1, os.cpu_count() or 1)
        self.score = session_scorer(self.session, config.batch_size)

    def __call__(self, paths: list[str], sizes: np.ndarray, target: np.ndarray,
                 cams: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], list[str | None]]:
        """Per method, per input: the faithfulness arrays (NaN where the input could not be read back as the run
        read it), and per input the reason it could not."""
        n, config = len(paths), self.config
        steps = config.steps
        out = {m: {"score": np.full(n, np.nan), "masked_score": np.full(n, np.nan), "drop": np.full(n, np.nan),
                   "increase": np.full(n, np.nan), "deletion": np.full((n, steps + 1), np.nan),
                   "insertion": np.full((n, steps + 1), np.nan)} for m in cams}
        errors: list[str | None] = [None] * n
        loaded = ordered_map(lambda item: load(item, self.size, self.max_bytes, self.max_pixels, False),
                             [self.view.item(p) for p in paths], self.workers,
                             max(2 * config.batch_size, 4 * self.workers))
        good: list[int] = []
        pixels: list[np.ndarray] = []
        for i, x in enumerate(loaded):
            if x.image is None:
                errors[i] = f"faithfulness: {x.key}: {x.error}"
            elif (x.image.width, x.image.height) != tuple(int(v) for v in sizes[i]):
                errors[i] = (f"faithfulness: {x.key}: now {x.image.width}x{x.image.height}, "
                             f"{sizes[i][0]}x{sizes[i][1]} when run; the file changed since the run")
            else:
                good.append(i)
                pixels.append(x.image.pixels)
        for a in range(0, len(good), config.batch_size):
            index = np.array(good[a:a + config.batch_size])
            images = np.stack(pixels[a:a + config.batch_size])
            measured = measure(self.score, images, target[index], {m: c[index] for m, c in cams.items()},
                               config.faithfulness, steps, config.baseline)
            for m, f in measured.items():
                out[m]["score"][index] = f.score
                out[m]["masked_score"][index] = f.masked_score
                out[m]["drop"][index] = f.drop
                out[m]["increase"][index] = np.where(np.isnan(f.masked_score), np.nan, f.increase)
                out[m]["deletion"][index] = f.deletion
                out[m]["insertion"][index] = f.insertion
        return out, errors


def _float_lists(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """Rows of a float [n, k] array as a list<float32> column, null where not valid."""
    n = len(valid)
    lengths = np.where(valid, values.shape[1] if values.ndim == 2 else 0, 0)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = values[valid].reshape(-1).astype(np.float32) if valid.any() else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(~valid))


def _nullable(values: np.ndarray, valid: np.ndarray, type: pa.DataType) -> pa.Array:
    return pa.array(values, type=type, mask=~valid)


def score_table(table: pa.Table, columns: dict[str, str], truth: GroundTruth, probe: FaithfulnessProbe | None,
                class_names: list[str]) -> pa.Table:
    """Metrics rows (one per input and method in `columns`, method -> CAM column) for a batch of results rows."""
    n = table.num_rows
    paths = table.column("path").to_pylist()
    ok = np.asarray(pc.equal(table.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False), bool)
    width = np.asarray(table.column("width").fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    height = np.asarray(table.column("height").fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    sizes = np.stack([width, height], axis=1)
    predicted = np.asarray(table.column("predicted_class").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    target = np.asarray(table.column("target_class").fill_null(0).to_numpy(zero_copy_only=False), np.int64)

    by_label = truth.labels.by_path if truth.labels else {}
    label = np.array([by_label.get(p, -1) for p in paths], np.int64)
    has_label = label >= 0
    if truth.boxes:
        boxes, owner, has_boxes = truth.boxes.owner_arrays(paths)
    else:
        boxes, owner, has_boxes = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(n, bool)
    counts = np.bincount(owner, minlength=n)
    box_lists = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts * 4)]).astype(np.int32)),
                                         pa.array(boxes.reshape(-1).astype(np.float32)), mask=pa.array(~has_boxes))
    shared = {
        "path": table.column("path"), "status": table.column("status"), "width": table.column("width"),
        "height": table.column("height"), "predicted_class": table.column("predicted_class"),
        "predicted_label": table.column("predicted_label"), "predicted_score": table.column("predicted_score"),
        "target_class": table.column("target_class"),
        "label": _nullable(label, has_label, pa.int32()),
        "label_name": pa.array([class_names[i] if 0 <= i < len(class_names) else None for i in label], pa.string()),
        "correct": _nullable(predicted == label, has_label & ok, pa.bool_()),
        "boxes": box_lists,
    }
    cams = {m: cam_array(table, column) for m, column in columns.items()}

    scored = ok & has_boxes
    position = np.full(n, -1)
    position[scored] = np.arange(int(scored.sum()))
    keep = position[owner] >= 0 if len(owner) else np.zeros(0, bool)

    faith: dict[str, dict[str, np.ndarray]] = {}
    faith_errors: list[str | None] = [None] * n
    if probe is not None and ok.any():
        chosen = np.flatnonzero(ok)
        measured, errors = probe([paths[i] for i in chosen], sizes[chosen], target[chosen],
                                 {m: c[chosen] for m, c in cams.items()})
        for m, arrays in measured.items():
            faith[m] = {}
            for name, values in arrays.items():
                full = np.full((n, *values.shape[1:]), np.nan)
                full[chosen] = values
                faith[m][name] = full
        for i, message in zip(chosen, errors):
            faith_errors[i] = message
    run_errors = table.column("error").to_pylist()
    errors = [e if e is not None else f for e, f in zip(run_errors, faith_errors)]

    parts = []
    for m, cam in cams.items():
        hit, energy, iou = np.zeros(n, bool), np.zeros(n), np.zeros(n)
        if scored.any():
            s = box_scores(cam[scored], sizes[scored], boxes[keep], position[owner[keep]])
            hit[scored], energy[scored], iou[scored] = s.hit, s.energy, s.iou
        columns = dict(shared)
        columns.update(method=pa.array([m] * n, pa.string()), error=pa.array(errors, pa.string()),
                       pointing_hit=_nullable(hit, scored, pa.bool_()),
                       energy=_nullable(energy, scored, pa.float32()), iou=_nullable(iou, scored, pa.float32()))
        f = faith.get(m)
        for name in ("score", "masked_score", "drop", "deletion_auc", "insertion_auc"):
            columns[name] = pa.nulls(n, pa.float32())
        columns["increase"] = pa.nulls(n, pa.bool_())
        columns["deletion_curve"] = columns["insertion_curve"] = pa.nulls(n, SCHEMA.field("deletion_curve").type)
        if f is not None:
            for name in ("score", "masked_score", "drop"):
                columns[name] = _nullable(f[name], ~np.isnan(f[name]), pa.float32())
            columns["increase"] = _nullable(f["increase"] == 1, ~np.isnan(f["increase"]), pa.bool_())
            for kind in ("deletion", "insertion"):
                curve = f[kind]
                valid = ~np.isnan(curve).any(axis=1)
                columns[f"{kind}_auc"] = _nullable(curve_auc(curve), valid, pa.float32())
                columns[f"{kind}_curve"] = _float_lists(curve, valid)
        parts.append(pa.table([columns[f.name] for f in SCHEMA], schema=SCHEMA))
    return pa.concat_tables(parts)


def evaluate(config: EvaluateConfig) -> EvaluationSummary:
    """Score every input of the run not scored yet, write the metrics rows, then the figures over all of them."""
    config.check()
    start = time.perf_counter()
    view = RunView(config.run_dir)
    if not view.cam_columns:
        raise RunError(f"{view.results_dir}: no CAM column in the results")
    cam_columns = chosen_columns(view, config.methods)
    methods = list(cam_columns)
    class_names = view.class_names
    index = view.dataset.to_table(columns=["path", "status", "width", "height"])
    keys = index.column("path").to_pylist()
    ok_keys = [k for k, s in zip(keys, index.column("status").to_pylist()) if s == "ok"]
    truth = ground_truth(config, keys, ok_keys, class_names, lambda key: view.item(key).key)
    box_counts = _box_checks(truth.boxes, index) if truth.boxes else None
    store = MetricsStore(view.root)
    run_fingerprint = fingerprint(config, view, truth, methods)
    shards = {p.name: p.stat().st_size for p in sorted(view.results_dir.glob("part-*.parquet"))}
    store.prepare(run_fingerprint, config.overwrite, shards)
    done = store.done_paths()
    pending = sum(1 for k in keys if k not in done)
    probe = FaithfulnessProbe(config, view) if config.faithfulness and pending else None
    options = {k: v for k, v in asdict(config).items() if k != "session"}
    options["device"] = config.session.device
    probed = {"faithfulness_probe": probe.precision if probe else probe_precision(view)} if config.faithfulness else {}
    store.start(run_fingerprint, options, results_shards=shards, methods=methods, class_names=class_names, **probed,
                ground_truth={"labels": _source_counts(truth.labels),
                              "boxes": {**_source_counts(truth.boxes), **box_counts} if truth.boxes else None})

    progress = Progress(pending, enabled=config.progress)
    done_array = pa.array(sorted(done), pa.string())
    rows = config.shard_size or (256 if config.faithfulness else 4096)
    columns = RESULT_COLUMNS + sorted(set(cam_columns.values()))

    def not_done() -> Iterator[pa.Table]:
        for batch in view.batches(columns, batch_size=rows):
            if len(done_array):
                batch = batch.filter(pc.invert(pc.is_in(batch.column("path"), value_set=done_array)))
            if batch.num_rows:
                yield batch

    def scored(batch: pa.Table) -> tuple[int, pa.Table]:
        return batch.num_rows, score_table(batch, cam_columns, truth, probe, class_names)

    # Box and label metrics are numpy on whole arrays, which releases the GIL: batches are scored on every core,
    # and written in order. Faithfulness has its own decode threads and the runtime's, so it goes one batch at a time.
    workers = 1 if probe else (config.workers or max(1, os.cpu_count() or 1))
    try:
        for count, table in ordered_map(scored, not_done(), workers, 2 * workers):
            store.write(table)
            progress.update(count)
    finally:
        progress.close()
    table = store.dataset().to_table(columns=[f.name for f in SCHEMA if f.name not in ("boxes",)] + ["boxes"])
    found = figures(table, class_names, methods, labelled_run=truth.labels is not None)
    seconds = time.perf_counter() - start
    info = store.finish(found, seconds=round(seconds, 3), evaluated_this_run=pending,
                        rows_per_second=round(pending / seconds, 1) if seconds > 0 else None)
    return EvaluationSummary(run_dir=str(view.root), evaluated=pending, already_done=len(keys) - pending,
                             seconds=seconds, info=info)


def _source_counts(source: Labels | Boxes | None) -> dict[str, Any] | None:
    """What a ground-truth file held that matched no input, so a mismatch shows instead of silently shrinking."""
    if source is None:
        return None
    counts: dict[str, Any] = {"source": source.source, "entries": source.listed, "unmatched": source.unmatched}
    if isinstance(source, Boxes):
        counts["empty_boxes_ignored"] = source.empty
    if isinstance(source, Labels) and source.unlabelled:
        counts["inputs_without_folder"] = len(source.unlabelled)
    return counts


def _box_checks(boxes: Boxes, index: pa.Table) -> dict[str, int]:
    """Boxes that reach beyond their image (clipped to it: wrong coordinates show here), and, for COCO, images whose
    recorded size differs from the one the run decoded (resized copies, or EXIF orientation not applied)."""
    keys = index.column("path").to_pylist()
    width = np.asarray(index.column("width").fill_null(0).to_numpy(zero_copy_only=False), np.float64)
    height = np.asarray(index.column("height").fill_null(0).to_numpy(zero_copy_only=False), np.float64)
    found, owner, _ = boxes.owner_arrays(keys)
    known = (width[owner] > 0) if len(owner) else np.zeros(0, bool)
    beyond = known & ((found[:, 0] < 0) | (found[:, 1] < 0) | (found[:, 2] > width[owner]) |
                      (found[:, 3] > height[owner]))
    position = {k: i for i, k in enumerate(keys)}
    mismatched = sum(1 for k, (w, h) in boxes.sizes.items()
                     if width[position[k]] > 0 and (w, h) != (width[position[k]], height[position[k]]))
    return {"boxes_beyond_image": int(beyond.sum()), "size_mismatch": mismatched}
