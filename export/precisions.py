"""The reduced-precision files of an artifact: each derived from the fp32 graph, judged by the precision gate
(export.gate) against fp32 on the gate images, then written, or refused with the figure that failed and why.

    fp16   model_fp16.onnx: the backbone in half precision; when full fp16 misses the gate, the front of the backbone
           is kept in fp32, a growing fraction of its convolutions at a time (export.fp16.FRONT_FRACTIONS).
           saved_model_fp16: the model's mixed_float16 twin (all of it in fp16); skipped, with its figures, when it
           misses the gate and the fp16 ONNX does not.
    int8   model_int8.onnx: the backbone quantized (export.int8), calibrated on the user's images (--calibrate).
    bf16   no file: TensorFlow runs saved_model with oneDNN bf16 (engine.bf16); export records its figures.

fp32 is always written: it is what every other file is derived from and judged against, and what every runtime runs.
A file the gate refuses is left out (its verdict recorded) and the rest of the artifact is written all the same;
export then raises export.errors.PrecisionGateError, which says so.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.calibration import (DEFAULT_IMAGES, MIN_IMAGES, GateImages, list_calibration,
                                               load_gate_images)
from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.gate import Verdict, judge, refusal

if TYPE_CHECKING:
    from gradcam_engine.export.api import ExportOptions

PRECISIONS = ("fp32", "fp16", "int8", "bf16")
ALIASES = {"both": ("fp32", "fp16")}
GATE_BATCH = 16
Outputs = dict[str, np.ndarray]
Call = Callable[[np.ndarray, np.ndarray], Outputs]  # (images, class_index) -> outputs
GateRecord = tuple[dict[str, Any] | None, dict[str, str]]  # the manifest's precision_gate; refused file -> why


def parse_precisions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'fp32,int8', 'both' or a list of names -> the precisions to export, fp32 first and always included."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = {"fp32"}
    for name in (n.strip() for n in names if n.strip()):
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in PRECISIONS:
            wanted.add(name)
        else:
            raise ExportError(f"unknown precision {name!r}; give a comma list of {', '.join(PRECISIONS)} "
                              f"(or {', '.join(ALIASES)})")
    return tuple(p for p in PRECISIONS if p in wanted)


def check_request(precision: str | Sequence[str], calibrate: Sequence[str] | None, images: int) -> None:
    """Refuse, before any slow work, a request that can only fail later."""
    wanted = parse_precisions(precision)
    if "int8" in wanted and not calibrate:
        raise ExportError("--precision int8 needs --calibrate IMAGES: int8 ranges are calibrated on your own images "
                          "(a directory, glob, path list, .tar shard or URI, as `gradcam run` takes)")
    if calibrate and wanted == ("fp32",):
        raise ExportError("--calibrate is for reduced precisions: add fp16, int8 or bf16 to --precision")
    if images < MIN_IMAGES:  # a quarter is held out for the gate: fewer cannot calibrate and judge
        raise ExportError(f"--calibration-images {images}: calibration and the precision gate need a sample of at "
                          f"least {MIN_IMAGES} images (default {DEFAULT_IMAGES})")
    if calibrate:
        list_calibration(calibrate, images)  # a missing path or too few images, said now


def _batched(call: Call, images: np.ndarray, class_index: np.ndarray | None) -> Outputs:
    """Batches of GATE_BATCH, the last one padded: one shape, so an XLA-compiled SavedModel compiles once."""
    ci = np.full(len(images), -1, np.int32) if class_index is None else class_index.astype(np.int32)
    parts = []
    for i in range(0, len(images), GATE_BATCH):
        x, c = images[i:i + GATE_BATCH], ci[i:i + GATE_BATCH]
        pad = GATE_BATCH - len(x) if len(images) > GATE_BATCH else 0
        out = call(np.concatenate([x, np.repeat(x[-1:], pad, 0)]), np.concatenate([c, np.repeat(c[-1:], pad)]))
        parts.append({k: v[:len(x)] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Gate:
    """The gate images and fp32's outputs on them, computed once and shared by every candidate."""

    images: GateImages
    reference: Outputs
    methods: tuple[str, ...] = ()   # the artifact's CAM methods: with several, every method's map is judged

    @property
    def outputs(self) -> tuple[str, ...]:
        """What a candidate is asked for: the engine's outputs, every method's maps when there are several."""
        return C.engine_outputs(self.methods)

    @classmethod
    def on(cls, proto: Any, images: GateImages, methods: Sequence[str] = ()) -> "Gate":
        """The gate for an fp32 graph on these images: fp32's outputs (its own top-1 explained), feature maps too."""
        fp32 = _onnx_call(proto.SerializeToString(), (*C.engine_outputs(methods), C.FEATURE_MAPS))
        return cls(images, _batched(fp32, images.held_out, None), tuple(methods))

    def judge(self, precision: str, candidate: Call, notes: dict[str, Any] | None = None) -> Verdict:
        """Run a candidate on the gate images (explaining fp32's classes, so CAMs compare) and judge it."""
        from gradcam_engine.export.parity import precision_figures

        got = _batched(candidate, self.images.held_out, self.reference[C.TARGET_CLASS])
        return judge(precision, precision_figures(self.reference, got, self.methods), notes)


@dataclass
class Export:
    """One export's reduced-precision step: what every precision writer reads and fills in."""

    root: Path
    proto: Any                                   # the fp32 ONNX graph every file is derived from
    options: ExportOptions
    gate: Gate
    precision: dict[str, str]                    # the manifest's file -> precision
    checks: dict[str, Any]                       # the manifest's verification figures
    write_onnx: Callable[[Path, Any, str], dict[str, Any]]
    write_fp16_saved_model: Callable[[Path], str | None]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # the gate's verdicts, by file
    refused: dict[str, str] = field(default_factory=dict)  # file -> why the gate refused it (left out)

    def record(self, label: str, verdict: Verdict) -> bool:
        """Record a verdict in the manifest; whether the file is to be written (passed, or kept on request)."""
        verdict.kept = not verdict.passed and self.options.keep_failing
        self.results[label] = verdict.record()
        return verdict.passed or self.options.keep_failing

    def keep(self, label: str, verdict: Verdict) -> bool:
        """Record a verdict; whether to write the file. A failed one is left out with the refusal noted (unless
        --keep-failing): the rest of the artifact does not depend on it."""
        if self.record(label, verdict):
            return True
        self.refused[label] = refusal(label, verdict, len(self.gate.images.calibration))
        return False

    def write(self, file: str, graph: Any, precision: str) -> None:
        """Write an ONNX file the gate kept (checked by onnx.checker, its verification figures recorded)."""
        self.checks[file] = self.write_onnx(self.root / file, graph, precision)
        self.precision[file] = precision


WRITERS: dict[str, Callable[[Export], None]] = {}


def writes(precision: str) -> Callable[[Callable[[Export], None]], Callable[[Export], None]]:
    """Register how one precision is derived, judged and written."""
    def register(fn: Callable[[Export], None]) -> Callable[[Export], None]:
        WRITERS[precision] = fn
        return fn
    return register


def write_reduced(root: Path, proto: Any, options: ExportOptions, precision: dict[str, str], checks: dict[str, Any],
                  write_onnx: Callable[[Path, Any, str], dict[str, Any]],
                  write_fp16_saved_model: Callable[[Path], str | None]) -> GateRecord:
    """Write every reduced precision the options ask for into root, each judged by the gate; returns the manifest's
    precision_gate section (None when only fp32 was asked for) and the refused files with why. `precision` and
    `checks` are the manifest's file -> precision map and verification figures, filled in here."""
    wanted = parse_precisions(options.precision)
    if wanted == ("fp32",):
        return None, {}
    images = load_gate_images(options.calibrate, options.calibration_images, input_size(proto))
    gate = Gate.on(proto, images, options.methods)
    export = Export(root, proto, options, gate, precision, checks, write_onnx, write_fp16_saved_model)
    for name in wanted[1:]:
        WRITERS[name](export)
    section = {"images": gate.images.source, "results": export.results}
    return {**section, "refused": list(export.refused)} if export.refused else section, export.refused


@writes("fp16")
def _fp16(export: Export) -> None:
    half, verdict = fp16_with_fp32_front(export.proto, export.gate)
    if not export.keep(C.ONNX_FP16_FILE, verdict):
        export.checks[C.SAVED_MODEL_FP16_DIR] = ("skipped: the fp16 ONNX misses the precision gate even with an fp32 "
                                                 "front, and this twin would be fp16 throughout")
        return
    export.write(C.ONNX_FP16_FILE, half, "fp16")
    _fp16_saved_model(export)


@writes("int8")
def _int8(export: Export) -> None:
    from gradcam_engine.engine.cpu import cpu_features
    from gradcam_engine.export.int8 import quantize_backbone

    quantized, info = quantize_backbone(export.proto, export.gate.images.calibration)
    # ONNX Runtime's int8 kernels differ by CPU (VNNI or not), so the figures hold for the CPU they were judged on
    notes = {"calibration": info, "runtime": "ONNX Runtime CPU", "cpu": cpu_features()}
    verdict = export.gate.judge("int8", _onnx_call(quantized.SerializeToString(), export.gate.outputs), notes)
    if export.keep(C.ONNX_INT8_FILE, verdict):
        export.write(C.ONNX_INT8_FILE, quantized, "int8")


@writes("bf16")
def _bf16_check(export: Export) -> None:
    export.keep(C.BF16_GATE_LABEL, _bf16(export.root / C.SAVED_MODEL_DIR, export.gate))


def input_size(proto: Any) -> tuple[int, int]:
    """(height, width) of a fused graph's images input."""
    dims = next(i for i in proto.graph.input if i.name == C.IMAGES).type.tensor_type.shape.dim
    return int(dims[1].dim_value), int(dims[2].dim_value)


def _onnx_call(model: bytes, outputs: tuple[str, ...] = C.ENGINE_OUTPUTS) -> Call:
    """A graph in ONNX Runtime on the CPU, set up as the engine sets it up."""
    from gradcam_engine.engine.session import onnx_session

    session = onnx_session(model, cuda=False)
    names = list(outputs)
    return lambda x, c: dict(zip(names, session.run(names, {C.IMAGES: x, C.CLASS_INDEX: c})))


def fp16_with_fp32_front(proto: Any, gate: Gate) -> tuple[Any, Verdict]:
    """The fp16 graph: full fp16 first; while the gate refuses it, keep a growing front of the backbone in fp32.
    Returns the first that passes (the smallest fp32 front), else the last tried, with its verdict."""
    from gradcam_engine.export.fp16 import backbone_convolutions, front_nodes, front_steps, to_fp16

    total = backbone_convolutions(proto.graph)
    for convolutions in [0, *front_steps(proto.graph)]:
        keep32 = frozenset(front_nodes(proto.graph, convolutions)) if convolutions else frozenset()
        half = to_fp16(proto, keep32)
        front = {"convolutions": convolutions, "of": total, "nodes": len(keep32)}
        verdict = gate.judge("fp16", _onnx_call(half.SerializeToString(), gate.outputs), {"fp32_front": front})
        if verdict.passed:
            break
    return half, verdict


def _fp16_saved_model(export: Export) -> None:
    """The mixed_float16 SavedModel, judged like the ONNX file; skipped with its figures when it misses the gate
    (the twin is fp16 throughout: Keras offers no front in fp32 to fall back on)."""
    path = export.root / C.SAVED_MODEL_FP16_DIR
    note = export.write_fp16_saved_model(path)
    if note is not None:
        export.checks[C.SAVED_MODEL_FP16_DIR] = note
        return
    verdict = export.gate.judge("fp16", _tf_call(path, export.gate.outputs))
    if export.record(C.SAVED_MODEL_FP16_DIR, verdict):
        export.precision[C.SAVED_MODEL_FP16_DIR] = "mixed_float16"
        return
    shutil.rmtree(path)
    export.checks[C.SAVED_MODEL_FP16_DIR] = (f"skipped: misses the precision gate ({', '.join(verdict.failed)}; "
                                             "figures in precision_gate); the fp16 ONNX is written; --keep-failing "
                                             "keeps it")


def _tf_call(saved_model: Path, outputs: tuple[str, ...]) -> Call:
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved_model)).signatures[C.SIGNATURE]

    def call(images: np.ndarray, class_index: np.ndarray) -> Outputs:
        out = fn(**{C.IMAGES: tf.constant(images), C.CLASS_INDEX: tf.constant(class_index)})
        return {k: out[k].numpy() for k in outputs}
    return call


def _bf16(saved_model: Path, gate: Gate) -> Verdict:
    """The fp32 SavedModel under TensorFlow's oneDNN bf16, judged; refused outright when TensorFlow left it fp32."""
    import tensorflow as tf

    from gradcam_engine.engine.bf16 import require_onednn, tf_bfloat16
    from gradcam_engine.engine.cpu import cpu_features, native_bf16
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.export.parity import TOLERANCES

    try:
        require_onednn()
    except RunError as e:
        raise ExportError(str(e).replace("--precision bf16", "bf16 check")) from None
    fp32 = _tf_call(saved_model, gate.outputs)

    def call(images: np.ndarray, class_index: np.ndarray) -> Outputs:
        with tf_bfloat16(tf):
            return fp32(images, class_index)
    cpu = {"native_bf16": native_bf16(), **cpu_features()}
    try:
        verdict = gate.judge("bf16", call, {"runtime": "TensorFlow oneDNN auto_mixed_precision_onednn_bfloat16",
                                           "cpu": cpu})
    except tf.errors.OpError as e:  # oneDNN without any bf16 path on this CPU cannot build the kernels
        raise ExportError(f"bf16 check: TensorFlow cannot run bf16 on this CPU ({first_line(e, 200)}); check bf16 "
                          "on a CPU with avx512_bf16 or amx_bf16") from None
    contract = TOLERANCES["fp32"]
    figures = verdict.figures
    if (figures["predictions_rel_diff"] <= contract["predictions_rel_diff"]
            and figures["cam_max_abs_diff"] <= contract["cam_max_abs_diff"]):
        raise ExportError("bf16 check: TensorFlow ran the graph in fp32 on this CPU (results equal fp32's within "
                          "1e-4), so bf16 cannot be judged here; check bf16 on a CPU with avx512_bf16 or amx_bf16")
    return verdict
