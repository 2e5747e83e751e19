"""Carry a large ONNX graph without its weights: strip them here, refill them with seeded random values there.

A GPU machine without TensorFlow cannot export, and a ResNet50 graph (94 MB) is larger than what one transfer
carries. Throughput does not depend on the weights' values, so the benchmark ships the graph's structure and
regenerates weights of the same shapes (LeCun-scaled, so activations stay in fp16's range).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

STRIPPED = "gradcam.stripped"  # metadata key listing the initializers to regenerate
MIN_ELEMENTS = 1024             # smaller constants (shapes, axes, means) travel as they are


def strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large float initializers are empty (their shapes and types kept)."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    names = []
    for init in stripped.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= MIN_ELEMENTS:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            names.append(init.name)
    entry = stripped.metadata_props.add()
    entry.key, entry.value = STRIPPED, "\n".join(names)
    return stripped


def fill_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Regenerate stripped initializers: LeCun-normal for matrices and kernels, zeros for vectors."""
    names = set(next((p.value for p in model.metadata_props if p.key == STRIPPED), "").split("\n")) - {""}
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name not in names:
            continue
        dims = tuple(init.dims)
        if len(dims) >= 2:
            # ONNX Conv kernels are [out, in, kh, kw]; MatMul weights [in, out].
            fan_in = int(np.prod(dims[1:])) if len(dims) == 4 else dims[0]
            value = rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        else:
            value = np.zeros(dims, np.float32)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    kept = [p for p in model.metadata_props if p.key != STRIPPED]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model
