"""Before anything is timed: every contender must compute what the reference computes on the same images.

A faster contender that computes something else is not a contender. Grad-CAM contenders are held to the reference's
CAMs, target classes and predictions; forward-only ones to its predictions, with the tolerances every parity check of
the product uses (export.parity): fp32 graphs differ from eager TensorFlow only by summation order; fp16, int8 and
bf16 graphs by rounding, held to the precision gate's limits (export.gate).
"""
from __future__ import annotations

import numpy as np

from gradcam_engine.export.gate import judge
from gradcam_engine.export.parity import TOLERANCES, failures, precision_figures
from gradcam_engine.export.parity import compare as parity_figures

Array = np.ndarray


def compare(expected: dict[str, Array], got: dict[str, Array], precision: str = "fp32",
            methods: tuple[str, ...] = ()) -> dict[str, object]:
    """The parity figures against the expected outputs, and whether all are within the precision's tolerance: fp32 to
    the contract (a top-1 mismatch fails too: the same images must get the same answer), a reduced precision to the
    precision gate's limits (export.gate); with `methods`, every method's map too."""
    figures = parity_figures(expected, got, methods)
    if precision in TOLERANCES:
        return {**figures, "ok": bool(not failures(figures, precision) and figures["top1_agreement"] == 1.0)}
    verdict = judge(precision, precision_figures(expected, got))
    return {**figures, **verdict.figures, "ok": verdict.passed}


def mixed_targets(top1: Array, num_classes: int) -> Array:
    """class_index for the check: -1 (top-1) on even slots, a class other than the top-1 on odd ones, so both the
    predicted-class path and the explicit-class path are checked."""
    out = np.full(len(top1), -1, np.int32)
    if num_classes > 1:
        out[1::2] = (np.asarray(top1[1::2]) + 1) % num_classes
    return out
