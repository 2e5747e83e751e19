"""A mixed-precision twin of a Keras model: the same layers and weights, computing in float16.

The fp16 SavedModel and the fp16 ONNX are both traced from this twin, so the two half-precision formats share
one definition, with float32 kept where the fused graph casts explicitly (preprocessing, final softmax, CAM).
"""
from __future__ import annotations

from typing import Any

import keras


def _to_mixed(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") == "float32":
            return {**node, "config": {**node["config"], "name": "mixed_float16"}}
        return {k: _to_mixed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_mixed(v) for v in node]
    return node


def mixed_precision_twin(model: Any) -> Any:
    """Rebuild `model` with every float32 layer policy set to mixed_float16, and copy its weights."""
    config = _to_mixed(keras.saving.serialize_keras_object(model))
    twin = keras.saving.deserialize_keras_object(config)
    twin.set_weights(model.get_weights())
    return twin
