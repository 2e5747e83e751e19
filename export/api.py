"""`export_artifact`: a Keras model (or a backbone/head pair) -> SavedModel + ONNX + manifest, written atomically."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import file_table
from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.errors import ExportError, PrecisionGateError
from gradcam_engine.export.methods import check_methods, summary
from gradcam_engine.export.precisions import ALIASES, PRECISIONS, GateRecord, check_request

ModelLike = Any  # a .keras/.h5 path, "module.py:function", a Keras or tf_keras model, or a (backbone, head) pair
EXPORT_PRECISIONS = (*PRECISIONS, *ALIASES)  # --precision takes a comma list of these (export.precisions)
SCORES = ("logit", "output")  # what is differentiated: the class logit (Grad-CAM paper) or the model's own output
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """What `gradcam export` accepts; the command line builds one of these."""

    layer: str = "auto"
    preprocessing: str = "none"
    class_names: Sequence[str] | None = None
    opset: int = DEFAULT_OPSET
    input_size: tuple[int, int] | None = None  # read from the model (or a pair's backbone) when its input is fixed
    precision: str = "fp32"                    # comma list of EXPORT_PRECISIONS; fp32 is always written
    score: str = "logit"                       # one of SCORES: "output" differentiates the softmax probability
    overwrite: bool = False
    verify_batch_sizes: tuple[int, ...] = field(default=(1, 3))
    methods: tuple[str, ...] = (C.DEFAULT_METHOD,)  # CAM methods (export.methods), in output order; `cam` = the first
    calibrate: Sequence[str] | None = None     # input specs of the user's images: int8 calibration, precision gate
    calibration_images: int = 200              # a deterministic sample of at most this many; a quarter held out
    keep_failing: bool = False                 # write a reduced-precision file that misses the precision gate


@dataclass
class ModelParts:
    """A model cut where Grad-CAM looks: what the fused graph is built from."""

    backbone: Any                 # images -> feature maps (or a dict of levels, read at feature_key)
    head: Any                     # export.head.KerasHead or CallableHead
    layer_path: str               # the target layer, as the manifest names it
    feature_key: str | None       # the level of a backbone that returns a dict
    input_size: tuple[int, int]   # (height, width)
    name: str                     # the model's name, for the manifest
    tracked: list[Any]            # objects the SavedModel must track (their weights)
    framework: str | None = None  # "keras" or "tf_keras" (the backbone's); None for a plain callable
    keras_model: Any = None       # the whole model when given as one (its mixed-precision twin is the fp16
                                  # SavedModel); None for a backbone/head pair


@dataclass
class GraphFacts:
    """What tracing the fused function tells about the graph, for the manifest."""

    specs: dict[str, tuple[str, tuple]]  # output name -> (dtype, shape with None for symbolic dims)
    num_classes: int
    class_names: list[str] | None


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ExportError(f"{p}: cannot read class names ({e.strerror})") from None
    if p.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list):
            raise ExportError(f"{p}: expected a JSON list of class names")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _fixed_input_size(model: Any) -> tuple[int, int] | None:
    """(H, W) of a Keras model's single image input when both are fixed."""
    inputs = getattr(model, "inputs", None) or []
    shape = tuple(inputs[0].shape) if len(inputs) == 1 else ()
    if len(shape) == 4 and shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[2])
    return None


def _pair_parts(backbone: Any, head: Any, options: ExportOptions) -> ModelParts:
    """A (backbone, head) pair: the layer names a level of a backbone returning a dict, or a layer inside a Keras
    backbone returning one tensor."""
    from gradcam_engine.export.frameworks import framework_of
    from gradcam_engine.export.graph import missing_level
    from gradcam_engine.export.head import KerasHead, head_from
    from gradcam_engine.export.locate import split_model

    size = options.input_size or _fixed_input_size(backbone)
    if size is None:
        raise ExportError("a (backbone, head) pair whose backbone has no fixed input size needs "
                          "input_size=(height, width) / --input-size HxW")
    head_obj = head_from(head, options.score)
    fw = framework_of(backbone)
    key = None if options.layer == "auto" else options.layer
    path = key or "backbone output"
    name = getattr(backbone, "name", None) or getattr(backbone, "__name__", "backbone")
    tracked = [backbone, *(head if isinstance(head, (list, tuple)) else [head])]
    graph = fw is not None and fw.is_model(backbone)
    if graph and isinstance(backbone.output, dict):
        if key not in backbone.output:
            raise missing_level(f"backbone {backbone.name!r}", list(backbone.output), key)
    elif graph and key is not None:  # a layer inside a backbone returning one tensor: the rest joins the head
        if not isinstance(head_obj, KerasHead):
            raise ExportError(f"layer {key!r} inside backbone {backbone.name!r} needs the head as Keras layers "
                              "(not a callable), so the layers after it can join the head")
        split = split_model(backbone, key)
        backbone, key, path = split.backbone, None, f"{name}/{split.layer_path}"
        head_obj = KerasHead([*split.head, *head_obj.layers], options.score)
    return ModelParts(backbone, head_obj, path, key, (int(size[0]), int(size[1])), name, tracked,
                      framework=fw.name if fw else None)


def model_parts(model: ModelLike, options: ExportOptions) -> ModelParts:
    """Cut a model (a file, module.py:function, a Keras or tf_keras model, or a (backbone, head) pair) at its
    target layer."""
    from gradcam_engine.export.head import KerasHead
    from gradcam_engine.export.locate import graph_framework, split_model
    from gradcam_engine.export.sources import resolve

    model = resolve(model)
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ExportError("a model given as a tuple must be (backbone, head)")
        return _pair_parts(*model, options)
    fw = graph_framework(model)
    split = split_model(model, options.layer)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ExportError(f"model input shape {shape} is not (N, H, W, 3) RGB images")
    size = options.input_size or (shape[1], shape[2])
    if size[0] is None or size[1] is None:
        raise ExportError("the model's input size is not fixed; pass input_size=(height, width) / --input-size HxW")
    return ModelParts(split.backbone, KerasHead(split.head, options.score), split.layer_path, None,
                      (int(size[0]), int(size[1])), model.name, [model], framework=fw.name, keras_model=model)


def _check_writable(out: Path, overwrite: bool) -> None:
    parent = out.parent.resolve()
    if out.exists() and not overwrite and any(out.iterdir() if out.is_dir() else [out]):
        raise ExportError(f"{out}: already exists; choose another --out or pass --overwrite")
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ExportError(f"{blocker}: is a file, not a directory; cannot create the output directory {out} there")
    if blocker is not None and not os.access(blocker, os.W_OK):  # created only once the model has exported
        raise ExportError(f"{blocker}: output directory is not writable")


def _check_options(options: ExportOptions) -> None:
    if options.preprocessing not in C.PREPROCESSING:
        raise ExportError(f"unknown preprocessing {options.preprocessing!r}; choose {', '.join(C.PREPROCESSING)}")
    if options.score not in SCORES:
        raise ExportError(f"unknown score {options.score!r}; choose {', '.join(SCORES)}")
    check_methods(options.methods)
    check_request(options.precision, options.calibrate, options.calibration_images)


def export_artifact(model: ModelLike, out: str | Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export one fused Grad-CAM graph as SavedModel + ONNX + manifest; returns the manifest."""
    from gradcam_engine.engine.tf_import import import_tensorflow

    import_tensorflow("export")

    _check_options(options)
    out = Path(out)
    _check_writable(out, options.overwrite)
    parts = model_parts(model, options)
    class_names = list(options.class_names) if options.class_names else None
    meta = {"gradcam.class_names": json.dumps(class_names), "gradcam.preprocessing": options.preprocessing,
            "gradcam.target_layer": parts.layer_path, "gradcam.score": parts.head.score}
    fused = _fused_graph(parts, options, meta)
    module, concrete, proto = fused.module, fused.concrete, fused.proto
    parts.head = module.head  # a callable head: the way of writing its gradient that converted
    specs = {k: (v.dtype.name, tuple(v.shape)) for k, v in concrete.structured_outputs.items()}
    num_classes = int(specs[C.PREDICTIONS][1][-1])
    if class_names is not None and len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names given but the model has {num_classes} classes")
    facts = GraphFacts(specs, num_classes, class_names)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot create the output directory ({e.strerror})") from None
    try:
        precision: dict[str, str] = {}
        checks: dict[str, Any] = {}
        _save(module, tmp / C.SAVED_MODEL_DIR, concrete)
        (tmp / C.ONNX_FILE).write_bytes(proto.SerializeToString())
        checks[C.ONNX_FILE] = fused.check
        precision.update({C.SAVED_MODEL_DIR: "fp32", C.ONNX_FILE: "fp32"})
        gate, refused = _write_reduced_precisions(tmp, proto, module, parts, options, precision, checks)
        manifest = _manifest(parts, options, facts, precision, checks)
        if gate is not None:
            manifest["precision_gate"] = gate
        manifest["files"] = file_table(tmp, list(precision))
        (tmp / C.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if refused:
        raise _gate_refusal(out, manifest, refused)
    return manifest


def _gate_refusal(out: Path, manifest: dict[str, Any], refused: dict[str, str]) -> PrecisionGateError:
    """The artifact is written without the refused files: say why each was refused and that the rest is usable."""
    written = sorted(set(manifest["precision"].values()), key=lambda p: p != "fp32")
    them = "it" if len(refused) == 1 else "them"
    return PrecisionGateError(f"{'; '.join(refused.values())}; {out} is written without {them} and runs as is "
                              f"({', '.join(written)}); pass --keep-failing to write {them} anyway",
                              out, manifest, list(refused))


@dataclass
class FusedGraph:
    """The fused function traced, converted to ONNX, and that ONNX graph checked against TensorFlow."""

    module: Any       # export.graph.FusedGradCAM
    concrete: Any     # its concrete function (the SavedModel signature)
    proto: Any        # the fp32 ONNX graph
    check: dict[str, Any]  # the fp32 graph's parity figures against TensorFlow


def _fused_graph(parts: ModelParts, options: ExportOptions, meta: dict[str, str]) -> FusedGraph:
    """Trace, convert and check the fused graph. An opaque callable head is tried with each way of writing its
    gradient (export.head.CallableHead) until one converts into a graph that ONNX Runtime runs and that agrees with
    TensorFlow; the refusal names why each failed."""
    from gradcam_engine.export.head import CallableHead

    heads = ([parts.head.with_strategy(s) for s in CallableHead.STRATEGIES] if isinstance(parts.head, CallableHead)
             else [parts.head])
    reasons = []
    for head in heads:
        try:
            return _fused_graph_with(parts, head, options, meta)
        except ExportError as e:
            if len(heads) == 1:
                raise
            reasons.append(f"{head.strategy.replace('_', ' ')}: {e}")
    raise ExportError("the head callable's gradient has no ONNX form that runs and agrees with TensorFlow ("
                      + "; ".join(reasons) + "); pass the head as Keras layers, whose gradients export writes itself")


def _fused_graph_with(parts: ModelParts, head: Any, options: ExportOptions, meta: dict[str, str]) -> FusedGraph:
    from gradcam_engine.export.graph import FusedGradCAM
    from gradcam_engine.export.to_onnx import convert

    module = FusedGradCAM(parts.backbone, head, parts.input_size, options.preprocessing,
                          feature_key=parts.feature_key, tracked=parts.tracked, methods=options.methods)
    try:
        concrete = module.concrete_function()
    except ExportError:
        raise
    except Exception as e:
        # AutoGraph wraps errors raised while tracing as "in user code: <stack>"; report the original one.
        cause = getattr(getattr(e, "ag_error_metadata", None), "cause_message", None) or str(e) or type(e).__name__
        raise ExportError(f"building the Grad-CAM graph failed: {first_line(cause, 300)}") from None
    proto = convert(module.gradcam, options.opset, meta)
    check = _check_onnx(proto, module.gradcam, parts.input_size, options, "fp32")
    return FusedGraph(module, concrete, proto, check)


def _save(module: Any, path: Path, concrete: Any) -> None:
    """tf.saved_model.save, its failures (an untracked resource, an unsaveable object) reported in one line."""
    import tensorflow as tf

    try:
        tf.saved_model.save(module, str(path), signatures={C.SIGNATURE: concrete})
    except Exception as e:  # TensorFlow raises AssertionError, ValueError, TypeError here
        raise ExportError(f"writing the SavedModel failed: {type(e).__name__}: {first_line(e, 300)}") from None


def _check_onnx(proto: Any, fn: Any, size: tuple[int, int], options: ExportOptions, precision: str) -> dict[str, Any]:
    """onnx.checker, then ONNX Runtime against the TensorFlow function; returns the figures, or refuses (an fp32
    graph that disagrees; a reduced precision's figures are judged by the precision gate, export.gate)."""
    import onnx

    from gradcam_engine.export.to_onnx import verify

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{precision} ONNX model failed onnx.checker: {first_line(e, 300)}") from None
    return verify(fn, proto.SerializeToString(), size, options.verify_batch_sizes, precision=precision,
                  methods=options.methods)


def _write_onnx(path: Path, proto: Any, fn: Any, size: tuple[int, int], options: ExportOptions,
                precision: str) -> dict[str, Any]:
    """Check an ONNX graph against the TensorFlow function, then write it; returns the check's figures."""
    checks = _check_onnx(proto, fn, size, options, precision)
    path.write_bytes(proto.SerializeToString())
    return checks


def _write_reduced_precisions(root: Path, proto: Any, module: Any, parts: ModelParts, options: ExportOptions,
                              precision: dict[str, str], checks: dict[str, Any]) -> GateRecord:
    """fp16, int8 and bf16 as asked, each judged by the precision gate (export.precisions); the gate's record and
    the files it refused."""
    from gradcam_engine.export.precisions import write_reduced

    return write_reduced(
        root, proto, options, precision, checks,
        write_onnx=lambda path, graph, p: _write_onnx(path, graph, module.gradcam, parts.input_size, options, p),
        write_fp16_saved_model=lambda path: _write_fp16_saved_model(path, parts, options))


def _write_fp16_saved_model(path: Path, parts: ModelParts, options: ExportOptions) -> str | None:
    """The fp16 SavedModel: the mixed-precision twin of a Keras or tf_keras model, XLA-compiled. None when written,
    else why not (a backbone/head pair has no one model to rebuild in mixed precision)."""
    from gradcam_engine.export.graph import FusedGradCAM
    from gradcam_engine.export.head import KerasHead
    from gradcam_engine.export.locate import split_model
    from gradcam_engine.export.mixed import mixed_precision_twin

    if parts.keras_model is None:
        return "skipped: an fp16 SavedModel needs a Keras model (not a backbone/head pair); the fp16 ONNX is written"
    try:
        twin = mixed_precision_twin(parts.keras_model)
    except ExportError:
        raise
    except Exception as e:  # a custom class whose config does not rebuild it
        return (f"skipped: the model could not be rebuilt in mixed_float16 ({type(e).__name__}: {first_line(e, 200)})"
                "; the fp16 ONNX is written")
    split = split_model(twin, options.layer)
    module = FusedGradCAM(split.backbone, KerasHead(split.head, options.score), parts.input_size,
                          options.preprocessing, tracked=[twin], jit_compile=True, methods=options.methods)
    _save(module, path, module.concrete_function())
    return None


def _manifest(parts: ModelParts, options: ExportOptions, facts: GraphFacts, precision: dict[str, str],
              checks: dict[str, Any]) -> dict[str, Any]:
    import keras
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    def dims(shape: tuple) -> list:
        return ["N" if d is None else int(d) for d in shape]

    height, width = parts.input_size
    fm_shape = facts.specs[C.FEATURE_MAPS][1]
    return {
        "format": "gradcam-engine-artifact",
        "manifest_version": C.MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_name": parts.name,
        "input": {"name": C.IMAGES, "dtype": "uint8", "shape": ["N", height, width, 3], "height": height,
                  "width": width, "channels": "RGB", "preprocessing": options.preprocessing},
        "class_index": {"name": C.CLASS_INDEX, "dtype": "int32", "shape": ["N"], "-1": "the model's top-1 class"},
        "num_classes": facts.num_classes,
        "class_names": facts.class_names,
        "target_layer": parts.layer_path,
        "framework": parts.framework,
        "head": [f"{layer.name} ({type(layer).__name__})" for layer in getattr(parts.head, "layers", [])],
        # how the head's gradient is written: export's own rules per layer, or TensorFlow's for a callable head,
        # per image in a loop or over the whole batch (export.head.CallableHead)
        "head_gradient": getattr(parts.head, "strategy", "rules"),
        "score": parts.head.score,
        "cam": {"height": int(fm_shape[1]), "width": int(fm_shape[2]), "channels": int(fm_shape[3]),
                "method": f"{options.methods[0]}: {summary(options.methods[0])}; ReLU, divided by the per-image max "
                          "(0 where the max is 0)"},
        "methods": list(options.methods),  # the maps in `cams` [N, M, h, w], in this order; `cam` is the first
        "outputs": [{"name": k, "dtype": facts.specs[k][0], "shape": dims(facts.specs[k][1])}
                    for k in C.OUTPUT_NAMES],
        "opset": options.opset,
        "precision": precision,
        "verification": checks,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, **_tf_keras_version(parts)},
    }


def _tf_keras_version(parts: ModelParts) -> dict[str, str]:
    from gradcam_engine.export.frameworks import framework_named, framework_of

    owners = {parts.framework, *(getattr(framework_of(layer), "name", None)
                                 for layer in getattr(parts.head, "layers", []))}
    return {"tf_keras": framework_named("tf_keras").version()} if "tf_keras" in owners else {}
