"""Parity: how two sets of graph outputs are compared, and how close they must be, in one place.

Export checks every ONNX file against the TensorFlow graph with these figures, the bench checks every contender
against the per-image reference with them, and the tests hold exports to the same tolerances. Pure numpy: importing
this pulls in no TensorFlow.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.export.methods import EIGENCAM

# fp32: the contract (a CAM may differ from the per-image reference by summation order only). Reduced precisions
# (fp16, int8, bf16) are judged by the precision gate (export.gate) on figures from precision_figures below.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"cam_max_abs_diff": 1e-4, "predictions_rel_diff": 1e-4, "cam_min_correlation": 0.999,
             "cams_max_abs_diff": 1e-4},
}
# Eigen-CAM is compared only on images whose first principal direction is defined: where the top two eigenvalues of
# the centred activations' Gram matrix are within this fraction of each other, any direction in their plane is as
# right as another, and two correct implementations may return different ones.
EIGEN_MIN_GAP = 0.05
HIGHER_IS_BETTER = frozenset({"cam_min_correlation", "top1_agreement"})
# A top-1 change counts as a near-tie when fp32 itself scores the two classes within this fraction of its largest
# |prediction|: either class is then the model's answer, and any rounding may swap them.
NEAR_TIE = 0.01


def cam_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of two CAM batches (1.0 for two equal flat maps, 0.0 for a flat one and not)."""
    out = np.empty(len(a))
    flat_a, flat_b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    for i, (x, y) in enumerate(zip(flat_a, flat_b)):
        if x.std() == 0 or y.std() == 0:
            out[i] = 1.0 if np.allclose(x, y, atol=1e-3) else 0.0
        else:
            out[i] = float(np.corrcoef(x, y)[0, 1])
    return out


def cam_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-image Pearson correlation of two CAM batches (1.0 for two identical flat maps)."""
    return float(cam_correlations(a, b).min()) if len(a) else 1.0


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


def _method_maps(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], index: int,
                 method: str) -> tuple[np.ndarray, np.ndarray]:
    """One method's maps on both sides; Eigen-CAM's only on images whose principal direction is defined."""
    ref, cand = reference[C.CAMS][:, index], candidate[C.CAMS][:, index]
    if method == EIGENCAM and C.FEATURE_MAPS in reference:
        defined = eigen_gap(reference[C.FEATURE_MAPS]) >= EIGEN_MIN_GAP
        ref, cand = ref[defined], cand[defined]
    return ref, cand


def _method_diff(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], index: int, method: str) -> float:
    ref, cand = _method_maps(reference, candidate, index, method)
    diff = np.abs(ref.astype(np.float64) - cand)
    return float(diff.max()) if diff.size else 0.0


def worst_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """The worst value of each figure over several comparisons (batch sizes, image sets)."""
    worst: dict[str, float] = {}
    for figures in runs:
        for k, v in figures.items():
            worst[k] = min(worst.get(k, v), v) if k in HIGHER_IS_BETTER else max(worst.get(k, v), v)
    return worst


def precision_figures(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                      methods: Sequence[str] = ()) -> dict[str, Any]:
    """What a user sees change between fp32 (reference, its own top-1 explained) and a reduced precision (candidate,
    run with the reference's target classes so the CAMs compare): top-1 changes, near-ties counted apart; CAM
    correlation mean and worst; CAM max abs diff; predictions diff; fp32's feature-map peak, which tells when
    activations are below a format's range; and, when both have every method's maps (`cams`, named by `methods`),
    each method's CAM correlations under `methods`."""
    pred_ref, pred = reference[C.PREDICTIONS].astype(np.float64), candidate[C.PREDICTIONS].astype(np.float64)
    n = len(pred_ref)
    scale = max(float(np.abs(pred_ref).max()), 1e-30)
    top_ref, top = pred_ref.argmax(-1), pred.argmax(-1)
    changed = np.flatnonzero(top_ref != top)
    margins = pred_ref[changed, top_ref[changed]] - pred_ref[changed, top[changed]]
    decisive = int((margins > NEAR_TIE * scale).sum())
    figures: dict[str, Any] = {
        "images": n,
        "top1_agreement": float(1 - len(changed) / n),
        "top1_changed": int(len(changed)),
        "top1_changed_near_ties": int(len(changed) - decisive),
        "top1_agreement_beyond_ties": float(1 - decisive / n),
        "top1_largest_margin_changed": float(margins.max() / scale) if len(changed) else 0.0,
        "predictions_rel_diff": float(np.abs(pred_ref - pred).max() / scale),
    }
    if C.CAM in reference and C.CAM in candidate:  # (a forward-only graph has predictions alone)
        corr = cam_correlations(reference[C.CAM], candidate[C.CAM])
        ref_live = reference[C.CAM].reshape(n, -1).max(-1) > 0
        cand_live = candidate[C.CAM].reshape(n, -1).max(-1) > 0
        figures.update({
            "cam_corr_mean": float(corr.mean()),
            "cam_corr_worst": float(corr.min()),
            "cam_max_abs_diff": float(np.abs(reference[C.CAM].astype(np.float64) - candidate[C.CAM]).max()),
            "cams_lost": int((ref_live & ~cand_live).sum()),  # all-zero maps where fp32's are not
        })
    if C.FEATURE_MAPS in reference:
        figures["feature_maps_peak"] = float(np.abs(reference[C.FEATURE_MAPS]).max())
    if len(methods) > 1 and C.CAMS in reference and C.CAMS in candidate:
        figures["methods"] = {m: _method_correlations(reference, candidate, i, m) for i, m in enumerate(methods)}
    return figures


def _method_correlations(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], index: int,
                         method: str) -> dict[str, float]:
    """One method's CAM correlations, Eigen-CAM's only on images whose principal direction is defined (as compare)."""
    ref, cand = _method_maps(reference, candidate, index, method)
    figures: dict[str, float] = {"images": int(len(ref)), "skipped": int(len(reference[C.CAMS]) - len(ref))}
    if len(ref):
        corr = cam_correlations(ref, cand)
        figures.update({"cam_corr_mean": float(corr.mean()), "cam_corr_worst": float(corr.min())})
    return figures


def failures(figures: dict[str, float], precision: str) -> list[str]:
    """The figures outside the precision's tolerances (a target-class mismatch always fails)."""
    limits = TOLERANCES[precision]
    failed = [k for k, limit in limits.items() if k in figures
              and (figures[k] < limit if k in HIGHER_IS_BETTER else figures[k] > limit)]
    if figures.get("target_class_mismatches"):
        failed.append("target_class")
    return failed
