"""Parity: how two sets of graph outputs are compared, and how close they must be, in one place.

Export checks every ONNX file against the TensorFlow graph with these figures, the bench checks every contender
against the per-image reference with them, and the tests hold exports to the same tolerances. Pure numpy: importing
this pulls in no TensorFlow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.export.methods import EIGENCAM

# fp32: the contract (a CAM may differ from the per-image reference by summation order only). fp16: CAMs compared for
# the same class; a near-tie may flip the top-1 of a random model, so top-1 agreement is recorded and checked on
# real data by the tests.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cam_max_abs_diff": 1e-4, "predictions_rel_diff": 1e-4, "cam_min_correlation": 0.999,
             "cams_max_abs_diff": 1e-4},
    "fp16": {"cam_max_abs_diff": 0.05, "predictions_rel_diff": 0.05, "cam_min_correlation": 0.99,
             "cams_max_abs_diff": 0.05},
}
# Eigen-CAM is compared only on images whose first principal direction is defined: where the top two eigenvalues of
# the centred activations' Gram matrix are within this fraction of each other, any direction in their plane is as
# right as another, and two correct implementations may return different ones.
EIGEN_MIN_GAP = 0.05
HIGHER_IS_BETTER = frozenset({"cam_min_correlation", "top1_agreement"})


def cam_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-image Pearson correlation of two CAM batches (1.0 for two identical flat maps)."""
    worst = 1.0
    for x, y in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        if x.std() == 0 or y.std() == 0:
            worst = min(worst, 1.0 if np.allclose(x, y, atol=1e-3) else 0.0)
        else:
            worst = min(worst, float(np.corrcoef(x, y)[0, 1]))
    return worst


def eigen_gap(feature_maps: np.ndarray) -> np.ndarray:
    """Per image, (l1 - l2) / l1 for the top two eigenvalues of the channel-centred activations' Gram matrix (0 for
    constant maps): how well Eigen-CAM's direction is defined."""
    n, h, w, c = feature_maps.shape
    x = feature_maps.reshape(n, h * w, c).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False) ** 2                  # (N, min(hw, C)), descending
    top, second = s[:, 0], (s[:, 1] if s.shape[1] > 1 else np.zeros(n))
    return np.where(top > 0, (top - second) / np.where(top > 0, top, 1.0), 0.0)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            methods: Sequence[str] = ()) -> dict[str, float]:
    """The parity figures: predictions diff relative to their scale and top-1 agreement; when both sides have CAMs,
    CAM max abs diff and worst correlation, and target-class mismatches; when both have every method's maps (`cams`,
    named by `methods`), their worst max abs diff."""
    pred_ref, pred = reference[C.PREDICTIONS].astype(np.float64), candidate[C.PREDICTIONS].astype(np.float64)
    scale = max(float(np.abs(pred_ref).max()), 1e-12)
    figures = {
        "predictions_rel_diff": float(np.abs(pred_ref - pred).max() / scale),
        "top1_agreement": float((pred_ref.argmax(-1) == pred.argmax(-1)).mean()),
    }
    if C.CAM in reference and C.CAM in candidate:
        figures.update({
            "cam_max_abs_diff": float(np.abs(reference[C.CAM].astype(np.float64) - candidate[C.CAM]).max()),
            "cam_min_correlation": cam_correlation(reference[C.CAM], candidate[C.CAM]),
            "target_class_mismatches": int((reference[C.TARGET_CLASS] != candidate[C.TARGET_CLASS]).sum()),
        })
    if methods and C.CAMS in reference and C.CAMS in candidate:
        figures["cams_max_abs_diff"] = max(_method_diff(reference, candidate, i, m) for i, m in enumerate(methods))
    return figures


def _method_diff(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], index: int, method: str) -> float:
    diff = np.abs(reference[C.CAMS][:, index].astype(np.float64) - candidate[C.CAMS][:, index])
    if method == EIGENCAM and C.FEATURE_MAPS in reference:
        diff = diff[eigen_gap(reference[C.FEATURE_MAPS]) >= EIGEN_MIN_GAP]
    return float(diff.max()) if diff.size else 0.0


def worst_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """The worst value of each figure over several comparisons (batch sizes, image sets)."""
    worst: dict[str, float] = {}
    for figures in runs:
        for k, v in figures.items():
            worst[k] = min(worst.get(k, v), v) if k in HIGHER_IS_BETTER else max(worst.get(k, v), v)
    return worst


def failures(figures: dict[str, float], precision: str) -> list[str]:
    """The figures outside the precision's tolerances (a target-class mismatch always fails)."""
    limits = TOLERANCES[precision]
    failed = [k for k, limit in limits.items() if k in figures
              and (figures[k] < limit if k in HIGHER_IS_BETTER else figures[k] > limit)]
    if figures.get("target_class_mismatches"):
        failed.append("target_class")
    return failed
