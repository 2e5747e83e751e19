"""A model session: an exported artifact loaded once in a runtime, then batch in, batch out.

`GradCAMSession` is a plain callable `dict[str, ndarray] -> dict[str, ndarray]`, so the same object serves the
local run loop, a benchmark, or a Ray Data `map_batches` actor. `prepare` and `run_prepared` split a call in two so
that a pipeline can stage batch k+1 (stack, pad, copy to the GPU) while batch k computes. Each runtime is a backend
class registered by name with `@backend`; a new runtime is one class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import Artifact, GraphSignature, check_graph, load_artifact, verify_files
from gradcam_engine.engine.errors import RunError

Arrays = dict[str, np.ndarray]
DEVICES = ("auto", "cpu", "cuda")
# What a run may ask for. auto: fp16 on CUDA when the artifact has it, else fp32 (never int8 or bf16). fast: the
# reduced precision that is fastest for this backend and device (int8 on ONNX Runtime with a VNNI/AMX CPU, bf16 on
# TensorFlow with a native-bf16 CPU, fp16 on CUDA) when the precision gate judged and passed it, else as auto.
PRECISIONS = ("auto", "fast", "fp32", "fp16", "int8", "bf16")
X64_QUANT_PRECISION = "session.x64quantprecision"  # ONNX Runtime: u8u8 instead of u8s8 on x86 without VNNI
_EXPORT_HINT = {"fp16": "--precision fp32,fp16", "int8": "--precision fp32,int8 --calibrate IMAGES"}


@dataclass(frozen=True)
class SessionOptions:
    """How to run an artifact: which runtime, device and precision, and the GPU feeding strategy."""

    backend: str = "onnx"          # onnx | tf
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # intra-op threads; 0 = the runtime's default
    precision: str = "auto"        # one of PRECISIONS
    io_binding: bool | None = None  # None: on for CUDA. Inputs go to the device once, only needed outputs come back
    fixed_batch: int = 0           # pad every batch to this size (stable shapes; required by cuda_graph)
    cuda_graph: bool = False       # ONNX Runtime CUDA graphs: replay one captured graph per batch
    trt: bool = False              # TensorRT execution provider (fp16), engine cache in trt_cache
    trt_cache: str | None = None


@dataclass
class Prepared:
    """A batch staged for the runtime: padded to the fixed size if any, on the device when bound."""

    n: int                 # real images (the rest is padding)
    feed: Any              # what the backend's run_prepared consumes


class Backend(Protocol):
    """One runtime: built from an artifact and the options, it stages and runs batches."""

    device: str
    precision: str

    def __init__(self, artifact: Artifact, options: SessionOptions) -> None: ...

    def prepare(self, images: np.ndarray, class_index: np.ndarray) -> Any: ...

    def run_prepared(self, feed: Any, outputs: tuple[str, ...]) -> Arrays: ...


BACKENDS: dict[str, type[Backend]] = {}


def backend(name: str) -> Callable[[type], type]:
    """Register a runtime under the name `--backend` takes."""
    def register(cls: type) -> type:
        BACKENDS[name] = cls
        return cls
    return register


class Session(Protocol):
    """What a run loop needs of a model session (GradCAMSession, or a stand-in in a test)."""

    artifact: Artifact

    @property
    def device(self) -> str: ...

    @property
    def precision(self) -> str: ...

    def prepare(self, batch: Arrays) -> "Prepared": ...

    def run_prepared(self, prepared: "Prepared") -> Arrays: ...


def cuda_available() -> bool:
    """Whether this onnxruntime build can run on CUDA (the onnxruntime-gpu package with a visible GPU)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_precision(requested: str, device: str, available: dict[str, str], fast: tuple[str, ...] = ()) -> str:
    """auto: fp16 on CUDA when the artifact has it, else fp32. fast: the first of the backend's `fast` precisions
    the artifact offers, else as auto. An explicit request must exist in the artifact."""
    if requested not in PRECISIONS:
        raise RunError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested == "fast":
        chosen = next((p for p in fast if p in available), None)
        if chosen:
            return chosen
        requested = "auto"
    if requested == "auto":
        if device == "cuda" and "fp16" in available:
            return "fp16"
        return "fp32" if "fp32" in available else "fp16"
    if requested not in available:
        raise RunError(f"--precision {requested}: the artifact has no {requested} file for this backend; "
                       f"re-export with {_EXPORT_HINT.get(requested, f'--precision fp32,{requested}')}")
    return requested


def gate_entry(artifact: Artifact, label: str) -> dict[str, Any] | None:
    """Export's precision-gate verdict on a file (or on bf16), None when it was never judged."""
    return artifact.manifest.get("precision_gate", {}).get("results", {}).get(label)


def gate_passed(artifact: Artifact, label: str) -> bool:
    """Whether export's precision gate judged this file against fp32 and passed it: `fast` never picks a file that
    was not judged, or that was kept although it failed."""
    entry = gate_entry(artifact, label)
    return bool(entry and entry.get("passed"))


def gate_verdict(artifact: Artifact, label: str, precision: str) -> str:
    """Why a reduced precision's quality is unknown or poor ("" when it passed the gate), with how to judge it."""
    entry = gate_entry(artifact, label)
    if entry is None:
        return (f"not judged against fp32 on your images; export with --precision fp32,{precision} "
                "--calibrate IMAGES to judge it")
    if not entry.get("passed"):
        failed = ", ".join(entry.get("failed", [])) or "its limits"
        return f"it failed the precision gate against fp32 ({failed}; figures in manifest.json precision_gate)"
    return ""


def fast_pick(artifact: Artifact, precision: str, label: str, unfit: str = "") -> tuple[tuple[str, ...], str]:
    """((precision,), "") when `fast` may pick it here, else ((), why not): this machine is `unfit` for it, or the
    gate did not pass it."""
    if unfit:
        return (), unfit
    return ((precision,), "") if gate_passed(artifact, label) else ((), gate_verdict(artifact, label, precision))


def precision_notes(artifact: Artifact, requested: str, chosen: str, label: str, wanted: str, why_not: str
                    ) -> list[str]:
    """What a run says about its precision: why `fast` ran `chosen` rather than `wanted`, or what the gate says of
    an explicitly asked reduced precision (`label`: its gate entry)."""
    if requested == "fast" and chosen != wanted and why_not:
        return [f"--precision fast ran {chosen}, not {wanted}: {why_not}"]
    if requested == chosen != "fp32":
        verdict = gate_verdict(artifact, label, chosen)
        return [f"--precision {chosen}: {verdict}"] if verdict else []
    return []


def _onnx_files(artifact: Artifact) -> dict[str, str]:
    files = {}
    for name, precision in artifact.manifest.get("precision", {C.ONNX_FILE: "fp32"}).items():
        if name.endswith(".onnx"):
            files[precision if precision in ("fp16", "int8") else "fp32"] = name
    return files


def onnx_session(path: str | Path | bytes, cuda: bool, threads: int = 0, cuda_graph: bool = False,
                 trt_cache: str | None = None, exact_int8: bool = False) -> Any:
    """An ONNX Runtime session set up for throughput; the one setup the engine, the bench and the GPU check share,
    so a Grad-CAM graph and its forward-only counterpart are always compared on equal terms.

    CUDA: NHWC kernels (the graph's layout, no transposes), the exhaustive cuDNN algorithm search and its full
    workspace, copies on their own stream; trt_cache adds TensorRT in fp16 in front, with its engines cached there.
    exact_int8: int8 products as u8u8 (exact, slower) on x86 CPUs without VNNI, where u8s8 ones can saturate.
    """
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        session_options.intra_op_num_threads = threads
    if exact_int8:
        session_options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    providers: list[Any] = ["CPUExecutionProvider"]
    if cuda:
        cuda_options = {"prefer_nhwc": "1", "cudnn_conv_algo_search": "EXHAUSTIVE",
                        "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "0"}
        if cuda_graph:
            cuda_options["enable_cuda_graph"] = "1"
        providers.insert(0, ("CUDAExecutionProvider", cuda_options))
        if trt_cache:
            Path(trt_cache).mkdir(parents=True, exist_ok=True)
            providers.insert(0, ("TensorrtExecutionProvider", {
                "trt_fp16_enable": "True", "trt_engine_cache_enable": "True", "trt_engine_cache_path": trt_cache}))
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, session_options, providers=providers)


@backend("onnx")
class OnnxBackend:
    """ONNX Runtime over model.onnx or model_fp16.onnx; CUDA (optionally TensorRT) when present, else CPU."""

    def __init__(self, artifact: Artifact, options: SessionOptions):
        import onnxruntime as ort

        self._ort = ort
        want_cuda = options.device == "cuda" or (options.device == "auto" and cuda_available())
        if options.device == "cuda" and not cuda_available():
            raise RunError("--device cuda: this onnxruntime has no CUDA provider; install gradcam-engine[gpu] "
                           "(onnxruntime-gpu) or use --device cpu")
        if options.precision == "bf16":
            raise RunError("--precision bf16: ONNX Runtime has no bf16 kernels for CPU (Conv, MatMul, Relu, Add are "
                           "not implemented for bfloat16); use --backend tf --precision bf16")
        from gradcam_engine.engine.cpu import missing_int8

        files = _onnx_files(artifact)
        wanted = "fp16" if want_cuda else "int8"
        if wanted in files:
            fast, why_not = fast_pick(artifact, wanted, files[wanted], "" if want_cuda else missing_int8())
        else:
            fast, why_not = (), f"the artifact has no {wanted} file; re-export with {_EXPORT_HINT[wanted]}"
        self.precision = choose_precision(options.precision, "cuda" if want_cuda else "cpu", files, fast)
        notes = precision_notes(artifact, options.precision, self.precision, files[self.precision], wanted, why_not)
        # Without VNNI/AMX, ONNX Runtime's u8s8 products saturate (VPMADDUBSW): run its exact u8u8 path instead.
        exact_int8 = self.precision == "int8" and bool(missing_int8())
        if exact_int8:
            notes.append(f"--precision int8: {missing_int8()}; running the exact u8u8 path (fp32 may be faster "
                         "here)")
        self.note = "; ".join(notes)
        path = artifact.path(files[self.precision])
        verify_files(artifact, [files[self.precision]])  # checksum of the file actually loaded

        trt_cache = None
        if want_cuda and options.trt:
            trt_cache = options.trt_cache or str(Path.home() / ".cache" / "gradcam-engine" / "trt")
        self.session = onnx_session(path, want_cuda, options.threads, options.cuda_graph, trt_cache, exact_int8)
        check_graph(artifact, onnx_signature(self.session), files[self.precision])
        active = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        if options.device == "cuda" and self.device != "cuda":
            raise RunError("--device cuda: the CUDA provider failed to load (see onnxruntime's log); "
                           "use --device cpu")
        if options.trt and "TensorrtExecutionProvider" not in active:
            raise RunError("--trt: the TensorRT provider did not load (TensorRT's libraries are missing?)")
        if options.cuda_graph and (self.device != "cuda" or not options.fixed_batch):
            raise RunError("--cuda-graph needs CUDA and a fixed batch size (--fixed-batch N)")
        self.io_binding = options.io_binding if options.io_binding is not None else self.device == "cuda"
        self.cuda_graph = options.cuda_graph
        self._static: dict[str, Any] | None = None

    def prepare(self, images: np.ndarray, class_index: np.ndarray) -> Any:
        if not self.io_binding:
            return {C.IMAGES: images, C.CLASS_INDEX: class_index}
        if self.cuda_graph:  # captured graphs replay fixed buffers: copy into them
            return images, class_index
        ortvalue = self._ort.OrtValue.ortvalue_from_numpy
        device = "cuda" if self.device == "cuda" else "cpu"
        # Copied to the device here, in the staging thread, so the copy overlaps the previous batch's compute.
        return ortvalue(images, device, 0), ortvalue(class_index, device, 0)

    def run_prepared(self, feed: Any, outputs: tuple[str, ...]) -> Arrays:
        if not self.io_binding:
            return dict(zip(outputs, self.session.run(list(outputs), feed)))
        if self.cuda_graph:
            return self._run_graph(feed, outputs)
        images, class_index = feed
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(C.IMAGES, images)
        binding.bind_ortvalue_input(C.CLASS_INDEX, class_index)
        for name in outputs:  # kept on the device; only these are copied back, never feature maps or gradients
            binding.bind_output(name, "cuda" if self.device == "cuda" else "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu()))

    def _run_graph(self, feed: tuple[np.ndarray, np.ndarray], outputs: tuple[str, ...]) -> Arrays:
        images, class_index = feed
        if self._static is None:  # first call: fixed device buffers, bound once, then captured by ONNX Runtime
            ov = self._ort.OrtValue
            static = {C.IMAGES: ov.ortvalue_from_numpy(images, "cuda", 0),
                      C.CLASS_INDEX: ov.ortvalue_from_numpy(class_index, "cuda", 0)}
            binding = self.session.io_binding()
            for name in (C.IMAGES, C.CLASS_INDEX):
                binding.bind_ortvalue_input(name, static[name])
            for name in outputs:
                binding.bind_output(name, "cuda")
            self._static = {"values": static, "binding": binding}
        else:
            self._static["values"][C.IMAGES].update_inplace(images)
            self._static["values"][C.CLASS_INDEX].update_inplace(class_index)
        binding = self._static["binding"]
        self.session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu()))


@backend("tf")
class TFBackend:
    """The SavedModel's serving signature; TensorFlow is imported only when this backend is chosen."""

    def __init__(self, artifact: Artifact, options: SessionOptions):
        from gradcam_engine.engine.tf_import import import_tensorflow

        tf = import_tensorflow("--backend tf")
        gpus = tf.config.list_physical_devices("GPU")
        if options.device == "cuda" and not gpus:
            raise RunError("--device cuda: TensorFlow sees no GPU; use --device cpu")
        self.device = "cuda" if gpus and options.device != "cpu" else "cpu"
        available = {("fp16" if p != "fp32" else "fp32"): name
                     for name, p in artifact.manifest.get("precision", {C.SAVED_MODEL_DIR: "fp32"}).items()
                     if not name.endswith(".onnx")}
        if options.precision == "int8":
            raise RunError("--precision int8: the int8 file is an ONNX graph; use --backend onnx")
        wanted, fast, why_not = "fp16", (("fp16",) if self.device == "cuda" else ()), ""
        labels = dict(available)
        if "fp32" in available and self.device == "cpu":
            from gradcam_engine.engine.bf16 import bf16_unavailable, require_bf16

            if options.precision == "bf16":
                require_bf16()
            wanted = "bf16"
            fast, why_not = fast_pick(artifact, "bf16", C.BF16_GATE_LABEL, bf16_unavailable())
            available["bf16"] = available["fp32"]  # bf16 is the fp32 SavedModel run under oneDNN bf16
            labels["bf16"] = C.BF16_GATE_LABEL
        elif options.precision == "bf16":
            raise RunError("--precision bf16 runs on CPU (TensorFlow's oneDNN) from the fp32 SavedModel; on a GPU "
                           "use fp16")
        self.precision = choose_precision(options.precision, self.device, available, fast)
        self.note = "; ".join(precision_notes(artifact, options.precision, self.precision, labels[self.precision],
                                              wanted, why_not))
        verify_files(artifact, [available[self.precision]])
        self._tf = tf
        self._device_name = "/GPU:0" if self.device == "cuda" else "/CPU:0"
        with tf.device(self._device_name):
            self._fn = tf.saved_model.load(str(artifact.path(available[self.precision]))).signatures[C.SIGNATURE]
        check_graph(artifact, tf_signature(self._fn), available[self.precision])

    def prepare(self, images: np.ndarray, class_index: np.ndarray) -> Any:
        return images, class_index

    def run_prepared(self, feed: Any, outputs: tuple[str, ...]) -> Arrays:
        from gradcam_engine.engine.bf16 import tf_bfloat16, tf_float32

        tf = self._tf
        images, class_index = feed
        with tf.device(self._device_name), (tf_bfloat16 if self.precision == "bf16" else tf_float32)(tf):
            result = self._fn(**{C.IMAGES: tf.constant(images), C.CLASS_INDEX: tf.constant(class_index)})
            return {k: result[k].numpy() for k in outputs}


def onnx_signature(session: Any) -> GraphSignature:
    """An ONNX Runtime session's inputs, outputs and model metadata, for check_graph."""
    def described(args: Any) -> dict[str, tuple[str, list[Any]]]:
        return {a.name: (a.type, list(a.shape)) for a in args}

    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return GraphSignature(described(session.get_inputs()), described(session.get_outputs()), metadata)


def tf_signature(fn: Any) -> GraphSignature:
    """A SavedModel signature's inputs and outputs, for check_graph."""
    def described(specs: dict[str, Any]) -> dict[str, tuple[str, list[Any]]]:
        return {name: (spec.dtype.name, spec.shape.as_list()) for name, spec in specs.items()}

    return GraphSignature(described(fn.structured_input_signature[1]), described(fn.structured_outputs))


class GradCAMSession:
    """Loads the artifact once; each call maps a batch {images, class_index} to the engine's outputs."""

    def __init__(self, artifact: str | Path | Artifact, options: SessionOptions = SessionOptions()):
        if options.backend not in BACKENDS:
            raise RunError(f"unknown backend {options.backend!r}; choose {', '.join(BACKENDS)}")
        if options.device not in DEVICES:
            raise RunError(f"unknown device {options.device!r}; choose {', '.join(DEVICES)}")
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify=[])
        self.options = options
        self.backend: Backend = BACKENDS[options.backend](self.artifact, options)

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def precision_note(self) -> str:
        """One line on the precision chosen, for the run to print and record ("" when there is nothing to say)."""
        return getattr(self.backend, "note", "")

    def prepare(self, batch: Arrays) -> Prepared:
        """Stage a batch: contiguous uint8, padded to the fixed size, copied to the device when bound."""
        images = np.ascontiguousarray(batch[C.IMAGES], dtype=np.uint8)
        n = images.shape[0]
        class_index = batch.get(C.CLASS_INDEX)
        class_index = np.full((n,), -1, np.int32) if class_index is None else np.asarray(class_index, np.int32)
        fixed = self.options.fixed_batch
        if fixed and n > fixed:
            raise RunError(f"a batch of {n} is larger than the fixed batch size {fixed}")
        if fixed and n < fixed:  # padding rows repeat the last image; their outputs are dropped
            images = np.concatenate([images, np.repeat(images[-1:], fixed - n, axis=0)])
            class_index = np.concatenate([class_index, np.repeat(class_index[-1:], fixed - n)])
        return Prepared(n=n, feed=self.backend.prepare(images, class_index))

    def run_prepared(self, prepared: Prepared, outputs: tuple[str, ...] | None = None) -> Arrays:
        """Run a staged batch; padding rows are cut off. By default the engine's outputs for this artifact's CAM
        methods; fewer (predictions alone, to score perturbed images) spare copying the rest back."""
        wanted = C.engine_outputs(self.artifact.methods) if outputs is None else outputs
        out = self.backend.run_prepared(prepared.feed, wanted)
        return {k: v[:prepared.n] for k, v in out.items()}

    def __call__(self, batch: Arrays, outputs: tuple[str, ...] | None = None) -> Arrays:
        return self.run_prepared(self.prepare(batch), outputs)
