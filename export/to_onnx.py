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
    _fold_captured_constants(proto, fn.get_concrete_function(*fn.input_signature))
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
    return proto


def _fold_captured_constants(proto: onnx.ModelProto, concrete: Any) -> None:
    """Drop the extra graph inputs tf2onnx makes of tensors the function captured by value (e.g. a Keras
    Normalization layer's mean and variance); callers could not feed them. Freezing has already turned their uses
    into constants; one still read by a node becomes an initializer holding the captured value."""
    from onnx import numpy_helper

    captured = {placeholder.name: value for value, placeholder in concrete.graph.captures
                if value.dtype != tf.resource and hasattr(value, "numpy")}
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for graph_input in [i for i in proto.graph.input if i.name not in C.INPUT_NAMES]:
        if graph_input.name in used:
            if graph_input.name not in captured:
                raise ExportError(f"ONNX conversion left an input {graph_input.name!r} besides "
                                  f"{', '.join(C.INPUT_NAMES)}; the model reads a tensor export cannot freeze")
            value = np.asarray(captured[graph_input.name].numpy())
            proto.graph.initializer.append(numpy_helper.from_array(value, graph_input.name))
        proto.graph.input.remove(graph_input)


def cam_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-image Pearson correlation of two CAM batches (1.0 for two identical flat maps)."""
    worst = 1.0
    for x, y in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        if x.std() == 0 or y.std() == 0:
            worst = min(worst, 1.0 if np.allclose(x, y, atol=1e-3) else 0.0)
        else:
            worst = min(worst, float(np.corrcoef(x, y)[0, 1]))
    return worst


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    """The parity figures used everywhere: CAM max abs diff and correlation, predictions diff relative to their
    scale, top-1 agreement."""
    pred_ref, pred = reference[C.PREDICTIONS].astype(np.float64), candidate[C.PREDICTIONS].astype(np.float64)
    scale = max(float(np.abs(pred_ref).max()), 1e-12)
    return {
        "cam_max_abs_diff": float(np.abs(reference[C.CAM].astype(np.float64) - candidate[C.CAM]).max()),
        "cam_min_correlation": cam_correlation(reference[C.CAM], candidate[C.CAM]),
        "predictions_rel_diff": float(np.abs(pred_ref - pred).max() / scale),
        "top1_agreement": float((pred_ref.argmax(-1) == pred.argmax(-1)).mean()),
        "target_class_mismatches": int((reference[C.TARGET_CLASS] != candidate[C.TARGET_CLASS]).sum()),
    }


# Tolerances by precision. fp32: the export contract. fp16: CAMs compared for the same class (a near-tie may
# flip the top-1 of a random model; top-1 agreement is recorded, and checked on real data by the tests).
TOLERANCES = {
    "fp32": {"cam_max_abs_diff": 1e-4, "predictions_rel_diff": 1e-4, "cam_min_correlation": 0.999},
    "fp16": {"cam_max_abs_diff": 0.05, "predictions_rel_diff": 0.05, "cam_min_correlation": 0.99},
}


def verify(fn: Any, model_bytes: bytes, input_size: tuple[int, int], batch_sizes: tuple[int, ...] = (1, 3),
           precision: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """Run ONNX Runtime and TensorFlow side by side on random images; refuse a graph that disagrees."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"the {precision} ONNX graph does not load in ONNX Runtime: "
                          f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
    rng = np.random.default_rng(seed)
    limits = TOLERANCES[precision]
    worst: dict[str, float] = {}
    for n in batch_sizes:
        images = rng.integers(0, 256, size=(n, *input_size, 3), dtype=np.uint8)
        ref = {k: v.numpy() for k, v in fn(tf.constant(images), tf.constant(np.full((n,), -1, np.int32))).items()}
        class_index = ref[C.TARGET_CLASS].astype(np.int32)  # the same class for both, so CAMs are comparable
        try:
            got = dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS),
                                                         {C.IMAGES: images, C.CLASS_INDEX: class_index})))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"the {precision} ONNX graph does not run in ONNX Runtime: "
                              f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
        for k, v in compare(ref, got).items():
            better_high = k in ("cam_min_correlation", "top1_agreement")
            worst[k] = min(worst.get(k, v), v) if better_high else max(worst.get(k, v), v)
    failed = [k for k, limit in limits.items()
              if (worst[k] < limit if k == "cam_min_correlation" else worst[k] > limit)]
    if failed or worst["target_class_mismatches"]:
        raise ExportError(f"the {precision} ONNX graph disagrees with TensorFlow on {', '.join(failed) or 'target'} "
                          f"({worst}); refusing to write it")
    return {"precision": precision, "batch_sizes": list(batch_sizes), **worst}
