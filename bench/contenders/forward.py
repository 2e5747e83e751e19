"""The forward-only limit: the same Keras model, same uint8 input and in-graph preprocessing, without the gradient.

Grad-CAM cannot be cheaper than predicting, so forward-only on the same runtime, precision and batch is the bound the
"explanation tax" is measured against. The ONNX variant is converted with tf2onnx exactly as export converts the
fused graph, so both sides of the ratio run the same kind of graph in the same runtime.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from gradcam_engine.engine import contract as C
from gradcam_engine.export.api import DEFAULT_OPSET


def forward_function(model: Any, preprocessing: str, input_size: tuple[int, int], jit: bool = False) -> Any:
    """tf.function: uint8 images [N, H, W, 3] -> {predictions}, scoped like the fused graph (export.graph) so that
    export.fp16 halves the same backbone in both; jit=True compiles it with XLA."""
    import tensorflow as tf

    from gradcam_engine.export.preprocess import preprocess

    h, w = input_size

    def forward(images: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.name_scope("preprocess"):
            x = preprocess(images, preprocessing)
        with tf.name_scope(C.FP16_SCOPE.rstrip("/")):
            y = model(x, training=False)
        return {C.PREDICTIONS: tf.identity(tf.cast(y, tf.float32), name=C.PREDICTIONS)}

    return tf.function(forward, jit_compile=jit or None,
                       input_signature=[tf.TensorSpec([None, h, w, 3], tf.uint8, name=C.IMAGES)])


def forward_onnx(model: Any, preprocessing: str, input_size: tuple[int, int], opset: int = DEFAULT_OPSET) -> Any:
    """The forward pass as an onnx.ModelProto, converted with tf2onnx as export converts the fused graph."""
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    fn = forward_function(model, preprocessing, input_size)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    return proto


def export_forward_onnx(model: Any, preprocessing: str, input_size: tuple[int, int], out: Path,
                        opset: int = DEFAULT_OPSET) -> Path:
    """Write (once) an ONNX graph of the forward pass with the fused graph's input; returns its path."""
    out = Path(out)
    if out.is_file():
        return out
    proto = forward_onnx(model, preprocessing, input_size, opset)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(proto.SerializeToString())
    os.replace(tmp, out)
    return out


def forward_part(fused: Path, out: Path) -> Path:
    """Write (once) the forward part of a fused graph: images -> predictions, the gradient and CAM nodes cut away.
    For the int8 graph this is its own forward-only counterpart: the same quantized backbone and float head."""
    out = Path(out)
    if out.is_file():
        return out
    import onnx
    from onnx.utils import Extractor

    part = Extractor(onnx.load(str(fused))).extract_model([C.IMAGES], [C.PREDICTIONS])
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(part, str(tmp))
    os.replace(tmp, out)
    return out
