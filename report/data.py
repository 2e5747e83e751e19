"""What the report shows, gathered from a run directory with bounded work: one streaming pass over results/ for the
aggregates and the gallery's candidates, metrics/ read once when the run was evaluated, and one filtered read of the
few rows the gallery shows. Memory grows with the number of classes and the gallery, not with the run (beyond one
float per input for the confidence histogram).
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gradcam_engine.engine.metrics import peak_points
from gradcam_engine.engine.metrics_store import METRICS_DIR, METRICS_JSON
from gradcam_engine.engine.run_view import RunView, cam_array

ERROR_ROWS = 200  # error rows listed in full; the rest are counted
BINS = 20


@dataclass
class Card:
    """One gallery image: a results row, its CAMs and, when evaluated, its ground truth and scores."""

    path: str
    predicted: str
    score: float
    width: int
    height: int
    cams: dict[str, np.ndarray] = field(default_factory=dict)
    label: str | None = None
    boxes: np.ndarray | None = None               # [k, 4] original pixels
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> hit, energy, iou, ...
    thumbnails: dict[str, str] = field(default_factory=dict)         # method -> data URI


@dataclass
class ReportData:
    """Everything the page needs, already reduced."""

    run_dir: Path
    info: dict[str, Any]
    manifest: dict[str, Any] | None
    methods: list[str]
    class_names: list[str]
    counts: dict[str, int]
    confidence: np.ndarray                      # predicted_score of every ok row
    confidence_correct: np.ndarray | None       # per ok row with a label: correct? (aligned to confidence_labelled)
    confidence_labelled: np.ndarray | None
    per_class: dict[int, dict[str, float]]      # predicted class -> images, mean confidence
    mean_cams: dict[str, dict[int, np.ndarray]]  # method -> predicted class -> mean CAM [h, w]
    peaks: dict[str, np.ndarray]                # method -> [h, w] count of peak cells
    errors: list[tuple[str, str]]
    error_count: int
    metrics: dict[str, Any] | None              # metrics.json, when an evaluation completed
    evaluation_interrupted: bool                # metrics.json says an evaluation is under way or was killed
    metric_values: dict[str, dict[str, np.ndarray]]  # method -> metric -> per-input values (evaluated runs)
    sections: dict[str, list[Card]]             # gallery section title -> cards

    @property
    def scored_methods(self) -> list[str]:
        """The methods the evaluation scored (`evaluate --methods` may have chosen some), in the run's order."""
        return scored_methods(self.methods, self.metrics)


def scored_methods(methods: list[str], metrics: dict[str, Any] | None) -> list[str]:
    """The run's methods that metrics.json lists as evaluated (all of them without metrics)."""
    chosen = (metrics or {}).get("methods") or methods
    return [m for m in methods if m in chosen] or methods


class _Best:
    """The k rows with the largest keys seen so far (ties: first seen), for a streaming pass."""

    def __init__(self, k: int):
        self.k, self.heap, self.seen = k, [], 0

    def offer(self, keys: np.ndarray, paths: list[str]) -> None:
        if self.k <= 0 or not len(keys):
            return
        top = np.argsort(-keys, kind="stable")[:self.k]
        for i in top:
            item = (float(keys[i]), -(self.seen + int(i)), paths[i])
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)
        self.seen += len(keys)

    def paths(self) -> list[str]:
        return [p for _, _, p in sorted(self.heap, reverse=True)]


def _numpy(table: pa.Table, name: str, fill: Any = None, dtype: Any = None) -> np.ndarray:
    column = table.column(name)
    if fill is not None:
        column = column.fill_null(fill)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


def gather(run_dir: str | Path, gallery: int) -> ReportData:
    """Read the run (and its metrics when evaluated) into a ReportData, with `gallery` images per gallery section."""
    view = RunView(run_dir)
    methods, names = view.methods, view.class_names
    columns = ["path", "status", "error", "width", "height", "predicted_class", "predicted_label", "predicted_score",
               "cam_height", "cam_width"] + sorted(set(view.cam_columns.values()))
    confidences: list[np.ndarray] = []
    per_class_n: dict[int, int] = {}
    per_class_sum: dict[int, float] = {}
    cam_sum: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    peaks: dict[str, np.ndarray] = {}
    errors: list[tuple[str, str]] = []
    counts = {"rows": 0, "ok": 0, "error": 0}
    most, least = _Best(gallery), _Best(gallery)
    for table in view.batches(columns):
        status = _numpy(table, "status", "")
        ok = status == "ok"
        counts["rows"] += table.num_rows
        counts["ok"] += int(ok.sum())
        counts["error"] += int((~ok).sum())
        if (~ok).any() and len(errors) < ERROR_ROWS:
            bad = table.filter(pa.array(~ok)).slice(0, ERROR_ROWS - len(errors))
            errors += list(zip(bad.column("path").to_pylist(), bad.column("error").fill_null("").to_pylist()))
        if not ok.any():
            continue
        good = table.filter(pa.array(ok))
        score = _numpy(good, "predicted_score", dtype=np.float64)
        predicted = _numpy(good, "predicted_class", dtype=np.int64)
        paths = good.column("path").to_pylist()
        confidences.append(score)
        most.offer(score, paths)
        least.offer(-score, paths)
        for c, n in zip(*np.unique(predicted, return_counts=True)):
            per_class_n[int(c)] = per_class_n.get(int(c), 0) + int(n)
            per_class_sum[int(c)] = per_class_sum.get(int(c), 0.0) + float(score[predicted == c].sum())
        sizes = np.stack([_numpy(good, "width", dtype=np.int64), _numpy(good, "height", dtype=np.int64)], axis=1)
        for m, column in view.cam_columns.items():
            cams = cam_array(good, column)
            for c in np.unique(predicted):
                total = cams[predicted == c].sum(axis=0, dtype=np.float64)
                cam_sum[m][int(c)] = cam_sum[m].get(int(c), 0) + total
            h, w = cams.shape[1:]
            x, y, has = peak_points(cams, sizes)
            cells = np.zeros(h * w, np.int64)
            col = np.minimum((x[has] / sizes[has, 0] * w).astype(np.int64), w - 1)
            row = np.minimum((y[has] / sizes[has, 1] * h).astype(np.int64), h - 1)
            np.add.at(cells, row * w + col, 1)
            peaks[m] = peaks.get(m, np.zeros((h, w), np.int64)) + cells.reshape(h, w)
    mean_cams = {m: {c: s / per_class_n[c] for c, s in sums.items()} for m, sums in cam_sum.items()}
    per_class = {c: {"images": n, "mean_confidence": per_class_sum[c] / n} for c, n in per_class_n.items()}

    metrics = _read_json(view.root / METRICS_JSON)
    evaluated = metrics is not None and metrics.get("status") == "complete"
    interrupted = metrics is not None and not evaluated
    metric_values: dict[str, dict[str, np.ndarray]] = {}
    sections: dict[str, list[str]] = {"Most confident": most.paths(), "Least confident": least.paths()}
    confidence_labelled = confidence_correct = None
    if evaluated:
        table = ds.dataset(str(view.root / METRICS_DIR), format="parquet").to_table(columns=[
            "path", "method", "status", "predicted_score", "correct", "label", "boxes", "pointing_hit", "energy",
            "iou", "drop", "deletion_auc", "insertion_auc"])
        table = table.filter(pc.equal(table.column("status"), "ok"))
        method = _numpy(table, "method", "")
        scored = scored_methods(methods, metrics)
        for m in scored:
            mine = table.filter(pa.array(method == m))
            metric_values[m] = {name: _numpy(mine, name, dtype=np.float64) for name in
                                ("energy", "iou", "drop", "deletion_auc", "insertion_auc")}
        first = table.filter(pa.array(method == scored[0]))
        labelled = first.column("correct").is_valid().to_numpy(zero_copy_only=False)
        if labelled.any():
            right = _numpy(first, "correct", False, bool)
            confidence_labelled = _numpy(first, "predicted_score", dtype=np.float64)[labelled]
            confidence_correct = right[labelled]
            wrong = labelled & ~right
            worst = _Best(gallery)
            worst.offer(_numpy(first, "predicted_score", dtype=np.float64)[wrong],
                        [p for p, w in zip(first.column("path").to_pylist(), wrong) if w])
            sections["Misclassified, most confident first"] = worst.paths()
        has_boxes = first.column("boxes").is_valid().to_numpy(zero_copy_only=False)
        if has_boxes.any():
            energy = _numpy(first, "energy", dtype=np.float64)
            worst = _Best(gallery)
            worst.offer(-energy[has_boxes], [p for p, b in zip(first.column("path").to_pylist(), has_boxes) if b])
            sections[f"Worst localised ({scored[0]}: least CAM energy inside the boxes)"] = worst.paths()
    cards = _cards(view, sorted({p for ps in sections.values() for p in ps}), evaluated)
    return ReportData(
        run_dir=view.root, info=view.info, manifest=view.manifest, methods=methods, class_names=names,
        counts=counts, confidence=np.concatenate(confidences) if confidences else np.zeros(0),
        confidence_correct=confidence_correct, confidence_labelled=confidence_labelled, per_class=per_class,
        mean_cams=mean_cams, peaks=peaks, errors=errors, error_count=counts["error"], metrics=metrics if evaluated
        else None, evaluation_interrupted=interrupted, metric_values=metric_values,
        sections={title: [cards[p] for p in paths if p in cards] for title, paths in sections.items()})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cards(view: RunView, paths: list[str], evaluated: bool) -> dict[str, Card]:
    """The gallery's rows, read back by path (one filtered scan), with their metrics when evaluated."""
    if not paths:
        return {}
    wanted = pa.array(paths, pa.string())
    columns = ["path", "width", "height", "predicted_label", "predicted_score", "cam_height", "cam_width"]
    table = view.dataset.to_table(columns=columns + sorted(set(view.cam_columns.values())),
                                  filter=ds.field("path").isin(wanted))
    cams = {m: cam_array(table, c) for m, c in view.cam_columns.items()}
    cards = {}
    for i, row in enumerate(table.select(columns).to_pylist()):
        cards[row["path"]] = Card(path=row["path"], predicted=str(row["predicted_label"]),
                                  score=float(row["predicted_score"]), width=int(row["width"]),
                                  height=int(row["height"]), cams={m: c[i] for m, c in cams.items()})
    if evaluated:
        metrics = ds.dataset(str(view.root / METRICS_DIR), format="parquet").to_table(
            columns=["path", "method", "label_name", "boxes", "pointing_hit", "energy", "iou", "drop",
                     "deletion_auc", "insertion_auc"], filter=ds.field("path").isin(wanted))
        for row in metrics.to_pylist():
            card = cards.get(row["path"])
            if card is None:
                continue
            card.label = row["label_name"]
            if row["boxes"] is not None:
                card.boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 4)
            card.scores[row["method"]] = {k: row[k] for k in ("pointing_hit", "energy", "iou", "drop",
                                                                "deletion_auc", "insertion_auc")}
    return cards
