"""The figures of metrics.json, computed from every committed metrics row: counts, classification (accuracy,
confusion matrix, per-class precision and recall), and per CAM method, overall and per class, the mean of each
box and faithfulness metric.

Means are over the inputs that have what the metric needs: box metrics over ok inputs with boxes, classification over
ok inputs with a label, faithfulness over ok inputs measured. Inputs without labels or boxes are counted, never
guessed. Fractions stay fractions (0.92, not 92).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from gradcam_engine.engine.metrics import confusion_matrix, precision_recall

def _column(table: pa.Table, name: str, dtype: Any = np.float64) -> np.ndarray:
    """A nullable column as numpy; nulls become NaN (numbers), False (flags) or None (objects)."""
    column = table.column(name)
    if dtype is bool:
        return np.asarray(column.fill_null(False).to_numpy(zero_copy_only=False), bool)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


def _valid(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).is_valid().to_numpy(zero_copy_only=False), bool)


def _curves(table: pa.Table, name: str) -> np.ndarray:
    """A list column of equal-length curves -> float [n, K + 1], NaN rows where null."""
    column = table.column(name).combine_chunks()
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    if not valid.any():
        return np.full((len(valid), 1), np.nan)
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float64)
    out = np.full((len(valid), len(values) // int(valid.sum())), np.nan)
    out[valid] = values.reshape(int(valid.sum()), -1)
    return out


def _mean(values: np.ndarray, where: np.ndarray) -> float | None:
    return float(np.mean(values[where])) if where.any() else None


class _Rows:
    """The metrics rows as numpy columns, read once and then sliced per method and class."""

    def __init__(self, table: pa.Table):
        self.method = _column(table, "method", object)
        self.ok = _column(table, "status", object) == "ok"
        self.error = _valid(table, "error")
        self.has_boxes = _valid(table, "boxes")
        self.has_label = _valid(table, "label")
        self.label = _column(table, "label")
        self.predicted = _column(table, "predicted_class")
        self.correct = _column(table, "correct", bool)
        self.hit = _column(table, "pointing_hit", bool)
        self.energy = _column(table, "energy")
        self.iou = _column(table, "iou")
        self.score = _column(table, "score")
        self.drop = _column(table, "drop")
        self.increase = _column(table, "increase", bool)
        self.auc = {kind: _column(table, f"{kind}_auc") for kind in ("deletion", "insertion")}
        self.curve = {kind: _curves(table, f"{kind}_curve") for kind in ("deletion", "insertion")}


def method_figures(rows: _Rows, select: np.ndarray) -> dict[str, Any]:
    """The means over one method's ok rows where `select` holds."""
    ok = select & rows.ok
    has_boxes = ok & rows.has_boxes
    labelled = ok & rows.has_label
    out: dict[str, Any] = {"images": int(ok.sum())}
    if has_boxes.any():
        out.update(images_with_boxes=int(has_boxes.sum()), pointing_game=_mean(rows.hit, has_boxes),
                   energy_pointing_game=_mean(rows.energy, has_boxes), iou=_mean(rows.iou, has_boxes))
        if labelled.any():
            out["pointing_game_correct"] = _mean(rows.hit, has_boxes & labelled & rows.correct)
            out["pointing_game_misclassified"] = _mean(rows.hit, has_boxes & labelled & ~rows.correct)
    measured = ok & ~np.isnan(rows.drop)
    if measured.any():
        out.update(faithfulness_images=int(measured.sum()), average_drop=_mean(rows.drop, measured),
                   increase_in_confidence=_mean(rows.increase, measured))
    for kind in ("deletion", "insertion"):
        has = ok & ~np.isnan(rows.auc[kind])
        if has.any():
            out["faithfulness_images"] = max(out.get("faithfulness_images", 0), int(has.sum()))
            out[f"{kind}_auc"] = _mean(rows.auc[kind], has)
            out[f"{kind}_curve"] = [float(v) for v in rows.curve[kind][has].mean(axis=0)]
    return out


def figures(table: pa.Table, class_names: list[str], methods: list[str], labelled_run: bool) -> dict[str, Any]:
    """Everything metrics.json reports, from the metrics rows (any order, one row per input and method)."""
    rows = _Rows(table)
    first = rows.method == methods[0]
    ok = first & rows.ok
    counts = {"inputs": int(first.sum()), "ok": int(ok.sum()), "error": int((first & ~rows.ok).sum()),
              "labelled": int((ok & rows.has_label).sum()), "unlabelled": int((ok & ~rows.has_label).sum()),
              "with_boxes": int((ok & rows.has_boxes).sum()), "without_boxes": int((ok & ~rows.has_boxes).sum()),
              "faithfulness_errors": int((ok & rows.error).sum())}
    out: dict[str, Any] = {"methods": methods, "counts": counts}

    k = len(class_names)
    if labelled_run:
        scored = ok & rows.has_label
        true, predicted = rows.label[scored].astype(np.int64), rows.predicted[scored].astype(np.int64)
        matrix = confusion_matrix(true, predicted, k)
        precision, recall = precision_recall(matrix)
        out["classification"] = {
            "images": int(len(true)), "accuracy": float(np.mean(true == predicted)) if len(true) else None,
            "macro_precision": _nanmean(precision), "macro_recall": _nanmean(recall),
            "confusion_matrix": {"classes": class_names, "rows": "label", "columns": "predicted",
                                 "matrix": matrix.tolist()},
            "per_class": {name: {"support": int(matrix[i].sum()), "predicted": int(matrix[:, i].sum()),
                                 "precision": _float(precision[i]), "recall": _float(recall[i])}
                          for i, name in enumerate(class_names)}}

    group = rows.label if labelled_run else rows.predicted
    out["per_class_by"] = "label" if labelled_run else "predicted_class"
    out["overall"] = {m: method_figures(rows, rows.method == m) for m in methods}
    per_class: dict[str, dict[str, Any]] = {}
    present = np.unique(group[rows.ok & ~np.isnan(group)]).astype(np.int64)
    for i in present:
        name = class_names[i] if 0 <= i < k else str(i)
        in_class = group == i
        per_class[name] = {m: method_figures(rows, (rows.method == m) & in_class) for m in methods}
    out["per_class"] = per_class
    return out


def _float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _nanmean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if np.isfinite(values).any() else None
