"""`export_artifact`: a Keras model (or a backbone/head pair) -> SavedModel + ONNX + manifest, written atomically."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import file_table
from gradcam_engine.engine.errors import first_line
from gradcam_engine.export.errors import ExportError

ModelLike = Any  # a path to a .keras file, a keras.Model, or a (backbone, head) pair of callables
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "bf16", "both")  # --precision takes a comma list (export.precisions)
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """What `gradcam export` accepts; the command line builds one of these."""

    layer: str = "auto"
    preprocessing: str = "none"
    class_names: Sequence[str] | None = None
    opset: int = DEFAULT_OPSET
    input_size: tuple[int, int] | None = None  # needed for a backbone/head pair; read from a Keras model otherwise
    precision: str = "fp32"                    # comma list of EXPORT_PRECISIONS; fp32 is always written
    overwrite: bool = False
    verify_batch_sizes: tuple[int, ...] = field(default=(1, 3))
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
    keras_model: Any = None       # the whole Keras model when given as one (its mixed-precision twin is the fp16
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


def _load_keras(path: Path) -> Any:
    import keras

    if not path.exists():
        raise ExportError(f"{path}: no such file")
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ExportError(f"{path}: not a Keras model file (expected a .keras file saved by Keras 3)")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise ExportError(f"{path}: not a loadable Keras model (a .keras file is a zip archive; this one is not)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise ExportError(f"{path}: not a loadable Keras model ({first_line(e, 200)})") from None


def model_parts(model: ModelLike, options: ExportOptions) -> ModelParts:
    """Cut a model (a .keras path, a Keras model or a (backbone, head) pair) at its target layer."""
    import keras

    from gradcam_engine.export.head import CallableHead, KerasHead
    from gradcam_engine.export.locate import layer_chain, split_model

    if isinstance(model, (str, os.PathLike)):
        model = _load_keras(Path(model))
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ExportError("a model given as a tuple must be (backbone, head)")
        backbone, head = model
        if options.input_size is None:
            raise ExportError("a (backbone, head) pair needs input_size=(height, width)")
        if isinstance(head, keras.Model):
            head_obj = KerasHead(layer_chain(head))
        elif isinstance(head, keras.layers.Layer):
            head_obj = KerasHead([head])
        elif isinstance(head, (list, tuple)) and all(isinstance(h, keras.layers.Layer) for h in head):
            head_obj = KerasHead(list(head))
        elif callable(head):
            head_obj = CallableHead(head)
        else:
            raise ExportError(f"head must be Keras layers, a Keras model or a callable, got {type(head).__name__}")
        key = None if options.layer == "auto" else options.layer
        tracked = [backbone, head] if not isinstance(head, (list, tuple)) else [backbone, *head]
        return ModelParts(backbone, head_obj, key or "backbone output", key, options.input_size,
                          getattr(backbone, "name", "backbone"), tracked)
    split = split_model(model, options.layer)
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ExportError(f"model input shape {shape} is not (N, H, W, 3) RGB images")
    size = options.input_size or (shape[1], shape[2])
    if size[0] is None or size[1] is None:
        raise ExportError("the model's input size is not fixed; pass input_size=(height, width) / --input-size HxW")
    return ModelParts(split.backbone, KerasHead(split.head), split.layer_path, None, (int(size[0]), int(size[1])),
                      model.name, [model], keras_model=model)


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
    from gradcam_engine.export.precisions import check_request

    check_request(options.precision, options.calibrate, options.calibration_images)


def export_artifact(model: ModelLike, out: str | Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export one fused Grad-CAM graph as SavedModel + ONNX + manifest; returns the manifest."""
    from gradcam_engine.engine.tf_import import import_tensorflow

    tf = import_tensorflow("export")
    from gradcam_engine.export.graph import FusedGradCAM
    from gradcam_engine.export.to_onnx import convert

    _check_options(options)
    out = Path(out)
    _check_writable(out, options.overwrite)
    parts = model_parts(model, options)
    module = FusedGradCAM(parts.backbone, parts.head, parts.input_size, options.preprocessing,
                          feature_key=parts.feature_key, tracked=parts.tracked)
    try:
        concrete = module.gradcam.get_concrete_function()
    except ExportError:
        raise
    except Exception as e:
        # AutoGraph wraps errors raised while tracing as "in user code: <stack>"; report the original one.
        cause = getattr(getattr(e, "ag_error_metadata", None), "cause_message", None) or str(e) or type(e).__name__
        raise ExportError(f"building the Grad-CAM graph failed: {first_line(cause, 300)}") \
            from None
    specs = {k: (v.dtype.name, tuple(v.shape)) for k, v in concrete.structured_outputs.items()}
    num_classes = int(specs[C.PREDICTIONS][1][-1])
    class_names = list(options.class_names) if options.class_names else None
    if class_names is not None and len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names given but the model has {num_classes} classes")
    facts = GraphFacts(specs, num_classes, class_names)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot create the output directory ({e.strerror})") from None
    try:
        meta = {"gradcam.class_names": json.dumps(class_names), "gradcam.preprocessing": options.preprocessing,
                "gradcam.target_layer": parts.layer_path, "gradcam.score": parts.head.score}
        proto = convert(module.gradcam, options.opset, meta)
        precision: dict[str, str] = {}
        checks: dict[str, Any] = {}
        tf.saved_model.save(module, str(tmp / C.SAVED_MODEL_DIR), signatures={C.SIGNATURE: concrete})
        checks[C.ONNX_FILE] = _write_onnx(tmp / C.ONNX_FILE, proto, module.gradcam, parts.input_size, options, "fp32")
        precision.update({C.SAVED_MODEL_DIR: "fp32", C.ONNX_FILE: "fp32"})
        gate = _write_reduced_precisions(tmp, proto, module, parts, options, precision, checks)
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
    return manifest


def _write_reduced_precisions(root: Path, proto: Any, module: Any, parts: ModelParts, options: ExportOptions,
                              precision: dict[str, str], checks: dict[str, Any]) -> dict[str, Any] | None:
    """fp16, int8 and bf16 as asked, each judged by the precision gate (export.precisions); the gate's record."""
    from gradcam_engine.export.precisions import write_reduced

    return write_reduced(
        root, proto, options, precision, checks,
        write_onnx=lambda path, graph, p: _write_onnx(path, graph, module.gradcam, parts.input_size, options, p),
        write_fp16_saved_model=lambda path: _write_fp16_saved_model(path, parts, options))


def _write_onnx(path: Path, proto: Any, fn: Any, size: tuple[int, int], options: ExportOptions,
                precision: str) -> dict[str, Any]:
    """Check an ONNX graph against the TensorFlow function, then write it; returns the check's figures."""
    import onnx

    from gradcam_engine.export.to_onnx import verify

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{precision} ONNX model failed onnx.checker: {first_line(e)}") \
            from None
    data = proto.SerializeToString()
    checks = verify(fn, data, size, options.verify_batch_sizes, precision=precision)
    path.write_bytes(data)
    return checks


def _write_fp16_saved_model(path: Path, parts: ModelParts, options: ExportOptions) -> str | None:
    """The fp16 SavedModel: the mixed-precision twin of a Keras model, XLA-compiled. None when written, else
    why not (a backbone/head pair of plain callables has no Keras config to rebuild in mixed precision)."""
    import tensorflow as tf

    from gradcam_engine.export.graph import FusedGradCAM
    from gradcam_engine.export.head import KerasHead
    from gradcam_engine.export.locate import split_model
    from gradcam_engine.export.mixed import mixed_precision_twin

    if parts.keras_model is None:
        return "skipped: an fp16 SavedModel needs a Keras model (not a backbone/head pair); the fp16 ONNX is written"
    twin = mixed_precision_twin(parts.keras_model)
    split = split_model(twin, options.layer)
    module = FusedGradCAM(split.backbone, KerasHead(split.head), parts.input_size, options.preprocessing,
                          tracked=[twin], jit_compile=True)
    tf.saved_model.save(module, str(path), signatures={C.SIGNATURE: module.gradcam.get_concrete_function()})
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
        "head": [f"{layer.name} ({type(layer).__name__})" for layer in getattr(parts.head, "layers", [])],
        "score": parts.head.score,
        "cam": {"height": int(fm_shape[1]), "width": int(fm_shape[2]), "channels": int(fm_shape[3]),
                "method": "gradcam: mean-pooled gradients as channel weights, weighted channel mean, ReLU, "
                          "divided by the per-image max (0 where the max is 0)"},
        "outputs": [{"name": k, "dtype": facts.specs[k][0], "shape": dims(facts.specs[k][1])}
                    for k in C.OUTPUT_NAMES],
        "opset": options.opset,
        "precision": precision,
        "verification": checks,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
