"""Before anything is timed: every contender must compute what the reference computes on the same images.

A faster contender that computes something else is not a contender. Grad-CAM contenders are held to the reference's
CAMs, target classes and predictions; forward-only ones to its predictions. The tolerances are those of the graph's
precision: fp32 graphs differ from eager TensorFlow only by summation order; fp16 graphs by rounding.
"""
from __future__ import annotations

import numpy as np

from engine import contract as C

Array = np.ndarray
CAM_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}          # max |cam - reference cam|, CAMs are in [0, 1]
PREDICTION_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}   # max |p - reference p| / max |reference p|


def compare(expected: dict[str, Array], got: dict[str, Array], precision: str = "fp32") -> dict[str, object]:
    """Differences to the expected outputs and whether they are within the precision's tolerance."""
    ref = np.asarray(expected[C.PREDICTIONS], np.float64)
    scale = max(float(np.abs(ref).max()), 1e-12)
    result: dict[str, object] = {
        "predictions_rel_diff": float(np.abs(ref - np.asarray(got[C.PREDICTIONS], np.float64)).max() / scale),
        "top1_mismatches": int((ref.argmax(-1) != np.asarray(got[C.PREDICTIONS]).argmax(-1)).sum()),
    }
    ok = result["predictions_rel_diff"] <= PREDICTION_TOLERANCE[precision] and not result["top1_mismatches"]
    if C.CAM in got:
        result["cam_max_abs_diff"] = float(np.abs(np.asarray(expected[C.CAM], np.float64) - got[C.CAM]).max())
        result["target_class_mismatches"] = int((expected[C.TARGET_CLASS] != got[C.TARGET_CLASS]).sum())
        ok = ok and result["cam_max_abs_diff"] <= CAM_TOLERANCE[precision] and not result["target_class_mismatches"]
    result["ok"] = bool(ok)
    return result


def mixed_targets(top1: Array, num_classes: int) -> Array:
    """class_index for the check: -1 (top-1) on even slots, a class other than the top-1 on odd ones, so both the
    predicted-class path and the explicit-class path are checked."""
    out = np.full(len(top1), -1, np.int32)
    if num_classes > 1:
        out[1::2] = (np.asarray(top1[1::2]) + 1) % num_classes
    return out
