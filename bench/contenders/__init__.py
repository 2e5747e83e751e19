"""The contenders: each one a name and a call `(images uint8 [N,H,W,3], class_index int32 [N]) -> outputs`.

Grad-CAM contenders return the engine's outputs (predictions, target_class, target_score, cam); the all-methods
ones add every method's map (cams), from an artifact exported with them; forward-only ones return predictions. Each
is built once (sessions created, graphs loaded, weights resident) before any timing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import Artifact

Array = np.ndarray
Call = Callable[[Array, Array], dict[str, Array]]

REFERENCE, GRADCAM, FORWARD = "reference", "gradcam", "forward"
METHODS = "methods"  # Grad-CAM and every other CAM method, from one graph: what the extra methods cost


@dataclass
class Contender:
    """One way of computing the outputs, ready to call."""

    name: str          # "gradcam onnx-cpu", "forward tf-xla-cpu", "reference tf-eager-cpu"
    kind: str          # reference | gradcam | methods | forward
    runtime: str       # onnx-cpu | onnx-cuda | tf-cpu | tf-xla-cpu | tf-eager-cpu | ...
    precision: str     # fp32 | fp16 | int8 | bf16
    call: Call
    load_mb: float = 0.0
    per_image: bool = False  # the reference loops over images itself: one batch size only
    keep: Any = None         # what the call needs alive (a loaded SavedModel owns the variables its graph reads)


def _name(kind: str, runtime: str, precision: str) -> str:
    return f"{kind} {runtime}" + ("" if precision == "fp32" else f" {precision}")


def _ort_session(path: Path, device: str, threads: int) -> Any:
    from gradcam_engine.engine.session import cuda_available, onnx_session

    return onnx_session(path, device == "cuda" and cuda_available(), threads)


def _ort_device(session: Any) -> str:
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"


def onnx_gradcam(artifact: Artifact, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 kind: str = GRADCAM) -> Contender:
    """The fused graph in ONNX Runtime, through the engine's own session (as `gradcam run` uses it: with several
    methods it fetches `cams` too)."""
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    session = GradCAMSession(artifact, SessionOptions(backend="onnx", device=device, threads=threads,
                                                   precision=precision))

    def call(images: Array, class_index: Array) -> dict[str, Array]:
        return session({C.IMAGES: images, C.CLASS_INDEX: class_index})
    runtime = f"onnx-{session.device}"
    return Contender(_name(kind, runtime, precision), kind, runtime, precision, call, keep=session)


def onnx_forward(path: Path, device: str = "cpu", threads: int = 0, precision: str = "fp32") -> Contender:
    """The forward-only ONNX graph, in a session configured like the engine's."""
    session = _ort_session(path, device, threads)
    output = session.get_outputs()[0].name
    runtime = f"onnx-{_ort_device(session)}"

    def call(images: Array, class_index: Array) -> dict[str, Array]:
        return {C.PREDICTIONS: session.run([output], {C.IMAGES: images})[0]}
    return Contender(_name(FORWARD, runtime, precision), FORWARD, runtime, precision, call)


def _in_precision(call: Call, precision: str) -> Call:
    """A TensorFlow call as it runs in `precision`: bf16 switches oneDNN's bf16 rewrite on around it (refused, with
    the missing CPU feature named, where bf16 would only be emulated)."""
    if precision != "bf16":
        return call
    import tensorflow as tf

    from gradcam_engine.engine.bf16 import require_bf16, tf_bfloat16

    require_bf16()

    def bf16_call(images: Array, class_index: Array) -> dict[str, Array]:
        with tf_bfloat16(tf):
            return call(images, class_index)
    return bf16_call


def _tf_device(device: str) -> tuple[str, str]:
    """(TensorFlow device name, runtime suffix) for auto/cpu/cuda."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU")) and device != "cpu"
    return ("/GPU:0", "cuda") if gpu else ("/CPU:0", "cpu")


def load_saved_model(artifact: Artifact, device: str = "cpu", precision: str = "fp32") -> Any:
    """The artifact's SavedModel, loaded once and shared by the plain and the XLA contender."""
    import tensorflow as tf

    folder = C.SAVED_MODEL_FP16_DIR if precision == "fp16" else C.SAVED_MODEL_DIR  # bf16 runs the fp32 one
    with tf.device(_tf_device(device)[0]):
        return tf.saved_model.load(str(artifact.path(folder)))


def tf_gradcam(loaded: Any, jit: bool = False, device: str = "cpu", precision: str = "fp32",
               kind: str = GRADCAM, outputs: tuple[str, ...] = C.ENGINE_OUTPUTS) -> Contender:
    """The fused graph's SavedModel signature, called as the engine's TF backend calls it; jit=True compiles the
    same signature with XLA."""
    import tensorflow as tf

    where, suffix = _tf_device(device)
    signature = loaded.signatures[C.SIGNATURE]

    def engine_outputs(images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        out = signature(**{C.IMAGES: images, C.CLASS_INDEX: class_index})
        return {k: out[k] for k in outputs}
    fn = tf.function(engine_outputs, jit_compile=True) if jit else engine_outputs

    def call(images: Array, class_index: Array) -> dict[str, Array]:
        with tf.device(where):
            out = fn(tf.constant(images), tf.constant(class_index))
            return {k: v.numpy() for k, v in out.items()}
    runtime = f"tf-xla-{suffix}" if jit else f"tf-{suffix}"
    return Contender(_name(kind, runtime, precision), kind, runtime, precision, _in_precision(call, precision),
                     keep=loaded)


def tf_forward(model: Any, preprocessing: str, input_size: tuple[int, int], jit: bool = False,
               device: str = "cpu", precision: str = "fp32") -> Contender:
    """A tf.function of the Keras model's forward pass, the same uint8 input and preprocessing as the fused graph."""
    import tensorflow as tf

    from gradcam_engine.bench.contenders.forward import forward_function

    where, suffix = _tf_device(device)
    fn = forward_function(model, preprocessing, input_size, jit=jit)

    def call(images: Array, class_index: Array) -> dict[str, Array]:
        with tf.device(where):
            out = fn(tf.constant(images))
            return {C.PREDICTIONS: out[C.PREDICTIONS].numpy()}
    runtime = f"tf-xla-{suffix}" if jit else f"tf-{suffix}"
    return Contender(_name(FORWARD, runtime, precision), FORWARD, runtime, precision, _in_precision(call, precision))


# Not named `reference`: importing the submodule of that name sets it on this package, in place of a function.
def reference_contender(model: Any, target_layer: str, preprocessing: str) -> Contender:
    """The seed's per-image eager GradientTape loop."""
    from gradcam_engine.bench.contenders.reference import gradcam_reference, split_for_reference

    parts = split_for_reference(model, target_layer, preprocessing)

    def call(images: Array, class_index: Array) -> dict[str, Array]:
        return gradcam_reference(images, class_index, parts)
    return Contender(_name(REFERENCE, "tf-eager-cpu", "fp32"), REFERENCE, "tf-eager-cpu", "fp32", call,
                     per_image=True)


@dataclass(frozen=True)
class Spec:
    """Which contender: enough to build it here or in a fresh process (see bench.memory_worker)."""

    kind: str                 # reference | gradcam | methods | forward
    backend: str              # reference | onnx | tf | tf-xla
    device: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class Sources:
    """What contenders are built from."""

    artifact: str
    keras: str | None          # the Keras model (reference, TF forward-only); None for a bare artifact
    preprocessing: str
    forward_onnx: str | None   # the forward-only ONNX graph, written beforehand by bench.forward
    threads: int = 0
    methods_artifact: str | None = None  # the same model exported with every method (the methods contenders)
    forward_int8: str | None = None  # the int8 graph's forward part (bench.forward.forward_part), when it has one


def make(spec: Spec, sources: Sources, shared: dict[str, Any] | None = None) -> Contender:
    """Build one contender; `shared` keeps the Keras model and SavedModels loaded once across contenders."""
    from gradcam_engine.engine.artifact import load_artifact

    shared = {} if shared is None else shared
    if "artifact" not in shared:
        shared["artifact"] = load_artifact(sources.artifact, verify=[])
    artifact = shared["artifact"]

    def keras_model() -> Any:
        if "keras" not in shared:
            import keras
            shared["keras"] = keras.models.load_model(sources.keras, compile=False)
        return shared["keras"]

    if spec.kind == REFERENCE:
        return reference_contender(keras_model(), artifact.manifest["target_layer"], sources.preprocessing)
    if spec.kind == METHODS:
        return _methods(spec, sources, shared)
    if spec.kind == GRADCAM and spec.backend == "onnx":
        return onnx_gradcam(artifact, spec.device, spec.precision, sources.threads)
    if spec.kind == FORWARD and spec.backend == "onnx":
        path = sources.forward_int8 if spec.precision == "int8" else sources.forward_onnx
        return onnx_forward(Path(str(path)), spec.device, sources.threads, spec.precision)
    jit = spec.backend == "tf-xla"
    if spec.kind == GRADCAM:
        folder = "fp16" if spec.precision == "fp16" else "fp32"
        key = f"saved_model:{spec.device}:{folder}"
        if key not in shared:
            shared[key] = load_saved_model(artifact, spec.device, folder)
        return tf_gradcam(shared[key], jit, spec.device, spec.precision)
    return tf_forward(keras_model(), sources.preprocessing, artifact.input_size, jit, spec.device, spec.precision)


def _methods(spec: Spec, sources: Sources, shared: dict[str, Any]) -> Contender:
    """The all-methods contender of a runtime: the methods artifact, run exactly as its Grad-CAM-only twin."""
    from gradcam_engine.engine.artifact import load_artifact

    artifact = load_artifact(str(sources.methods_artifact), verify=[])
    if spec.backend == "onnx":
        return onnx_gradcam(artifact, spec.device, spec.precision, sources.threads, kind=METHODS)
    key = f"methods_saved_model:{spec.device}:{spec.precision}"
    if key not in shared:
        shared[key] = load_saved_model(artifact, spec.device, spec.precision)
    return tf_gradcam(shared[key], spec.backend == "tf-xla", spec.device, spec.precision, kind=METHODS,
                      outputs=C.engine_outputs(artifact.methods))
