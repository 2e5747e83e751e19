"""int8 ONNX: the fp32 graph with its backbone quantized statically (QDQ), calibrated on the user's images.

The recipe (measured on the demo model and the seed ResNet50; README, precision section):
  - static QDQ with onnxruntime.quantization, only the backbone's nodes (export.fp16.half_precision_nodes): the
    preprocessing, head, gradient rules, target selection and CAM stay float32;
  - activations uint8, asymmetric: ONNX Runtime's CPU kernels then fuse every Conv into QLinearConv (with int8
    activations a third of ResNet50's convolutions stay Dequantize -> fp32 Conv -> Quantize, no faster than fp32);
  - weights int8, symmetric, per output channel; ranges from MinMax calibration (Percentile and Entropy gave no
    better CAMs and clip out-of-range activations on unfamiliar images).
  - the node that writes the target layer's feature maps stays float: the head, gradients and CAM read a float
    tensor made by a float op, never a DequantizeLinear.
Two traps of ONNX Runtime 1.31 are avoided: quantize_static rewires EVERY reader of a quantized constant to its
DequantizeLinear, so constants shared with the head are copied first (split_shared_constants); and its
CalibMaxIntermediateOutputs option drops data, so it is not set (MinMax keeps two numbers per tensor and batch).
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from gradcam_engine.engine import contract as C
from gradcam_engine.export.fp16 import half_precision_nodes

CALIBRATION_BATCH = 8
RECIPE = {"format": "QDQ", "activations": "uint8 asymmetric", "weights": "int8 symmetric per channel",
          "calibration": "MinMax", "scope": "backbone"}


def quantizable_nodes(graph: onnx.GraphProto) -> list[str]:
    """The backbone's nodes, less those whose output leaves the backbone (read by the head or CAM, or a graph
    output), so every float32 consumer outside the backbone reads a tensor computed in float."""
    inside = half_precision_nodes(graph)
    outputs = {o.name for o in graph.output}
    read_outside = {x for n in graph.node if n.name not in inside for x in n.input} | outputs
    return [n.name for n in graph.node if n.name in inside and not read_outside.intersection(n.output)]


def split_shared_constants(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Give the non-quantized readers of a constant that a quantized node also reads their own float copy; returns
    how many constants were split. (In the demo model the preprocessing's 0.0 is read by a backbone op and by the
    head's and the CAM's comparisons.)"""
    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in initializers:
                readers.setdefault(name, []).append((node, k))
    split = 0
    for name, uses in readers.items():
        outside = [(node, k) for node, k in uses if node.name not in quantized]
        if outside and len(outside) < len(uses):
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[name])
            copy.name = f"{name}__float"
            model.graph.initializer.append(copy)
            for node, k in outside:
                node.input[k] = copy.name
            split += 1
    return split


def _reader(images: np.ndarray) -> Any:
    """Calibration batches of the decoded uint8 images, both graph inputs fed (-1: each image's own top-1)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            return {C.IMAGES: batch, C.CLASS_INDEX: np.full(len(batch), -1, np.int32)}
    return Batches()


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_static logs advice on the root logger ("consider pre-processing": measured, it changes nothing here);
    keep it off the user's terminal, and keep logging's own defaults untouched."""
    root = logging.getLogger()
    level, guard = root.level, logging.NullHandler()
    root.addHandler(guard)  # a root logger with a handler is not given basicConfig's stderr handler
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(guard)


def quantize_backbone(model: onnx.ModelProto, images: np.ndarray) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """fp32 fused graph + calibration images (uint8 [N, H, W, 3], decoded as the engine decodes) -> int8 graph, and
    what was done, for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = quantizable_nodes(model.graph)
    split = split_shared_constants(model, set(nodes))
    with tempfile.TemporaryDirectory(prefix="gradcam-int8-") as tmp, _quiet_root_logger():
        out = Path(tmp) / "int8.onnx"
        quantize_static(model, out, _reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        quantized = onnx.load(str(out))
    quantized.doc_string = model.doc_string
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    return quantized, {**RECIPE, "calibration_images": int(len(images)), "quantized_nodes": len(nodes),
                       "split_constants": split}
