"""A mixed-precision twin of a Keras model: the same layers and weights, computing in float16.

The fp16 SavedModel is traced from this twin, with float32 kept where the fused graph casts explicitly
(preprocessing, final softmax, CAM). Each framework rebuilds its own models (`Framework.mixed_twin`).
"""
from __future__ import annotations

from typing import Any

from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.frameworks import framework_of


def mixed_precision_twin(model: Any, policy: str = "mixed_float16") -> Any:
    """Rebuild `model` with every float32 layer computing under `policy`, and copy its weights."""
    fw = framework_of(model)
    if fw is None:
        raise ExportError(f"{type(model).__name__} is not a Keras model; cannot rebuild it in {policy}")
    return fw.mixed_twin(model, policy)
