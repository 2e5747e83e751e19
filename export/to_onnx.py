"""tf2onnx conversion of the fused function, and the numerical check that the ONNX graph agrees with TensorFlow."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import tensorflow as tf

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.api import DEFAULT_OPSET
from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.parity import TOLERANCES, compare, failures, worst_of


def convert(fn: Any, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Convert the fused tf.function to ONNX with a dynamic batch; names follow engine.contract."""
    import tf2onnx  # heavy; only export needs it

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    except Exception as e:  # tf2onnx raises bare exceptions for unsupported ops
        raise ExportError(f"ONNX conversion failed: {first_line(e)}") from None
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


def verify(fn: Any, model_bytes: bytes, input_size: tuple[int, int], batch_sizes: tuple[int, ...] = (1, 3),
           precision: str = "fp32", seed: int = 0, methods: tuple[str, ...] = (C.DEFAULT_METHOD,)) -> dict[str, Any]:
    """Run ONNX Runtime and TensorFlow side by side on random images; refuse an fp32 graph that disagrees (a reduced
    precision's figures are recorded here and judged by the precision gate, export.gate)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"the {precision} ONNX graph does not load in ONNX Runtime: {first_line(e, 300)}") from None
    rng = np.random.default_rng(seed)
    runs = []
    names = C.ENGINE_OUTPUTS + (C.CAMS,)  # every method's map is checked, not only the first
    for n in batch_sizes:
        images = rng.integers(0, 256, size=(n, *input_size, 3), dtype=np.uint8)
        ref = {k: v.numpy() for k, v in fn(tf.constant(images), tf.constant(np.full((n,), -1, np.int32))).items()}
        class_index = ref[C.TARGET_CLASS].astype(np.int32)  # the same class for both, so CAMs are comparable
        try:
            got = dict(zip(names, session.run(list(names), {C.IMAGES: images, C.CLASS_INDEX: class_index})))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"the {precision} ONNX graph does not run in ONNX Runtime: {first_line(e, 300)}") \
                from None
        runs.append(compare(ref, got, methods))
    worst = worst_of(runs)
    failed = failures(worst, precision) if precision in TOLERANCES else []
    if failed:
        raise ExportError(f"the {precision} ONNX graph disagrees with TensorFlow on {', '.join(failed)} "
                          f"({worst}); refusing to write it")
    return {"precision": precision, "batch_sizes": list(batch_sizes), **worst}
