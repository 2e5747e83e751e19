"""tf2onnx conversion of the fused function, and the numerical check that the ONNX graph agrees with TensorFlow."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import tensorflow as tf

from engine import contract as C
from export.errors import ExportError

DEFAULT_OPSET = 17


def convert(fn: Any, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Convert the fused tf.function to ONNX with a dynamic batch; names follow engine.contract."""
    import tf2onnx  # heavy; only export needs it

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    except Exception as e:  # tf2onnx raises bare exceptions for unsupported ops
        raise ExportError(f"ONNX conversion failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    bad = sorted({n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if bad:
        raise ExportError(f"ONNX conversion left TensorFlow ops it cannot convert: {', '.join(bad)}; pass the "
                          "head as Keras layers so its gradient is written in plain ops")
    names = {o.name for o in proto.graph.output}
    if names != set(C.OUTPUT_NAMES):
        raise ExportError(f"ONNX graph outputs {sorted(names)} differ from the contract {sorted(C.OUTPUT_NAMES)}")
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "Fused Grad-CAM graph exported by gradcam-engine"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX model failed onnx.checker: {str(e).splitlines()[0]}") from None
    return proto


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    """The parity figures used everywhere: CAM max abs diff, predictions diff relative to their scale, top-1."""
    pred_ref, pred = reference[C.PREDICTIONS].astype(np.float64), candidate[C.PREDICTIONS].astype(np.float64)
    scale = max(float(np.abs(pred_ref).max()), 1e-12)
    return {
        "cam_max_abs_diff": float(np.abs(reference[C.CAM].astype(np.float64) - candidate[C.CAM]).max()),
        "predictions_rel_diff": float(np.abs(pred_ref - pred).max() / scale),
        "target_class_mismatches": int((reference[C.TARGET_CLASS] != candidate[C.TARGET_CLASS]).sum()),
    }


def verify(fn: Any, model_bytes: bytes, input_size: tuple[int, int], batch_sizes: tuple[int, ...] = (1, 3),
           cam_tol: float = 1e-4, pred_tol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Run ONNX Runtime and TensorFlow side by side on random images; refuse a graph that disagrees."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = {"cam_max_abs_diff": 0.0, "predictions_rel_diff": 0.0, "target_class_mismatches": 0}
    for n in batch_sizes:
        images = rng.integers(0, 256, size=(n, *input_size, 3), dtype=np.uint8)
        class_index = np.full((n,), -1, np.int32)
        ref = {k: v.numpy() for k, v in fn(tf.constant(images), tf.constant(class_index)).items()}
        got = dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS),
                                                     {C.IMAGES: images, C.CLASS_INDEX: class_index})))
        for k, v in compare(ref, got).items():
            worst[k] = max(worst[k], v)
    if (worst["cam_max_abs_diff"] > cam_tol or worst["predictions_rel_diff"] > pred_tol
            or worst["target_class_mismatches"]):
        raise ExportError(f"the ONNX graph disagrees with TensorFlow ({worst}); refusing to write it")
    return {"batch_sizes": list(batch_sizes), **worst}
