"""The engine's core: load an exported artifact once, then batch in, batch out.

`GradCAMRunner` is a plain callable `dict[str, ndarray] -> dict[str, ndarray]`, so the same object serves the
local streaming loop, a benchmark, or a Ray Data `map_batches` actor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine import contract as C
from engine.artifact import Artifact, load_artifact
from engine.errors import RunError

Batch = dict[str, np.ndarray]


class Backend(Protocol):
    device: str

    def run(self, images: np.ndarray, class_index: np.ndarray, outputs: tuple[str, ...]) -> Batch: ...


def cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA (the onnxruntime-gpu package with a visible GPU)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxBackend:
    """ONNX Runtime session over model.onnx; CUDA when asked for (or available under auto), else CPU."""

    def __init__(self, artifact: Artifact, device: str = "auto", threads: int = 0, onnx_file: str = C.ONNX_FILE):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        want_cuda = device == "cuda" or (device == "auto" and cuda_available())
        if device == "cuda" and not cuda_available():
            raise RunError("--device cuda: this onnxruntime has no CUDA provider; install gradcam-engine[gpu] "
                           "(onnxruntime-gpu) or use --device cpu")
        providers: list[Any] = ["CPUExecutionProvider"]
        if want_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"prefer_nhwc": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}))
        self.session = ort.InferenceSession(str(artifact.path(onnx_file)), options, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise RunError("--device cuda: the CUDA provider failed to load (see onnxruntime's log); "
                           "use --device cpu")

    def run(self, images: np.ndarray, class_index: np.ndarray, outputs: tuple[str, ...]) -> Batch:
        values = self.session.run(list(outputs), {C.IMAGES: images, C.CLASS_INDEX: class_index})
        return dict(zip(outputs, values))


class TFBackend:
    """The SavedModel's serving signature; TensorFlow is imported only when this backend is chosen."""

    def __init__(self, artifact: Artifact, device: str = "auto", saved_model: str = C.SAVED_MODEL_DIR):
        try:
            import tensorflow as tf
        except ImportError:
            raise RunError("--backend tf needs TensorFlow: pip install 'gradcam-engine[export]'") from None
        gpus = tf.config.list_physical_devices("GPU")
        if device == "cuda" and not gpus:
            raise RunError("--device cuda: TensorFlow sees no GPU; use --device cpu")
        self.device = "cuda" if gpus and device != "cpu" else "cpu"
        self._tf = tf
        self._device_name = "/GPU:0" if self.device == "cuda" else "/CPU:0"
        with tf.device(self._device_name):
            self._fn = tf.saved_model.load(str(artifact.path(saved_model))).signatures[C.SIGNATURE]

    def run(self, images: np.ndarray, class_index: np.ndarray, outputs: tuple[str, ...]) -> Batch:
        tf = self._tf
        with tf.device(self._device_name):
            result = self._fn(**{C.IMAGES: tf.constant(images), C.CLASS_INDEX: tf.constant(class_index)})
        return {k: result[k].numpy() for k in outputs}


BACKENDS = {"onnx": OnnxBackend, "tf": TFBackend}


@dataclass(frozen=True)
class RunnerOptions:
    """How to run an artifact: which runtime, on which device."""

    backend: str = "onnx"
    device: str = "auto"
    threads: int = 0


class GradCAMRunner:
    """Loads the artifact once; each call maps a batch {images, class_index} to the engine's outputs."""

    def __init__(self, artifact: str | Any, options: RunnerOptions = RunnerOptions()):
        if options.backend not in BACKENDS:
            raise RunError(f"unknown backend {options.backend!r}; choose {', '.join(BACKENDS)}")
        if options.device not in ("auto", "cpu", "cuda"):
            raise RunError(f"unknown device {options.device!r}; choose auto, cpu or cuda")
        needed = [C.ONNX_FILE] if options.backend == "onnx" else [C.SAVED_MODEL_DIR]
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify=needed)
        self.options = options
        if options.backend == "onnx":
            self.backend: Backend = OnnxBackend(self.artifact, options.device, options.threads)
        else:
            self.backend = TFBackend(self.artifact, options.device)

    @property
    def device(self) -> str:
        return self.backend.device

    def __call__(self, batch: Batch) -> Batch:
        images = np.ascontiguousarray(batch[C.IMAGES], dtype=np.uint8)
        n = images.shape[0]
        class_index = batch.get(C.CLASS_INDEX)
        class_index = np.full((n,), -1, np.int32) if class_index is None else np.asarray(class_index, np.int32)
        return self.backend.run(images, class_index, C.ENGINE_OUTPUTS)
