"""`gradcam export`: a Keras or tf_keras model (a file, or module.py:function) -> an artifact directory."""
from __future__ import annotations

import argparse
from typing import Any

from gradcam_engine.cli.options import default, size
from gradcam_engine.engine import contract as C


def _export(args: argparse.Namespace) -> int:
    from gradcam_engine.engine.tf_import import import_tensorflow
    from gradcam_engine.export.methods import check_methods

    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])  # before TensorFlow loads
    import_tensorflow("gradcam export")
    from gradcam_engine.export import ExportOptions, PrecisionGateError, export_artifact, read_class_names
    from gradcam_engine.export.sources import import_modules

    import_modules(args.imports or [])
    options = ExportOptions(
        layer=args.layer, preprocessing=args.preprocess, opset=args.opset, precision=args.precision,
        score=args.score, class_names=read_class_names(args.classes) if args.classes else None,
        input_size=args.input_size, overwrite=args.overwrite, methods=methods, calibrate=args.calibrate,
        calibration_images=args.calibration_images, keep_failing=args.keep_failing)
    try:
        manifest = export_artifact(args.model, args.out, options)
    except PrecisionGateError as e:  # written without the refused files: say what is there, then why (exit 2)
        print(summary(e.manifest, args.out))
        raise
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict[str, Any], out: str) -> str:
    """What was exported, how big each file is, and how well each ONNX file agrees with TensorFlow."""
    cam = manifest["cam"]
    groups: dict[str, int] = {}
    for rel, meta in manifest["files"].items():
        groups[rel.split("/")[0]] = groups.get(rel.split("/")[0], 0) + meta["bytes"]
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in groups.items())
    lines = [f"exported {manifest['model_name']} -> {out}: layer {manifest['target_layer']} "
             f"(cam {cam['height']}x{cam['width']}x{cam['channels']}), score {manifest['score']}, "
             f"{manifest['num_classes']} classes, opset {manifest['opset']}; {sizes}",
             f"  CAM methods: {', '.join(manifest['methods'])} (output cam: the first; cams: all, in this order)"]
    for file, check in manifest["verification"].items():
        if isinstance(check, dict):
            lines.append(f"  {file} ({check['precision']}) vs TensorFlow fp32: cam max diff "
                         f"{check['cam_max_abs_diff']:.1e}, cam correlation >= {check['cam_min_correlation']:.4f}, "
                         f"every method's map max diff {check.get('cams_max_abs_diff', 0.0):.1e}, "
                         f"top-1 agreement {check['top1_agreement']:.0%}")
        else:
            lines.append(f"  {file}: {check}")
    return "\n".join(lines + gate_lines(manifest))


def gate_lines(manifest: dict[str, Any]) -> list[str]:
    """The precision gate's figures for every reduced-precision file, passed or not."""
    from gradcam_engine.export.gate import file_label, summary as figures

    gate = manifest.get("precision_gate")
    if not gate:
        return []
    images = gate["images"]
    lines = [f"  precision gate vs fp32 on {images['images']} {images['kind']}:"]
    for label, entry in gate["results"].items():
        outcome = "passed"
        if not entry["passed"]:
            kept = entry.get("kept_although_failed")
            outcome = f"FAILED {', '.join(entry['failed'])}, {'kept (--keep-failing)' if kept else 'not written'}"
        front = entry.get("fp32_front", {})
        if front.get("convolutions"):
            outcome += f"; first {front['convolutions']} of {front['of']} convolutions in fp32"
        lines.append(f"    {file_label(label, entry['precision'])}: {figures(entry['figures'])}: {outcome}")
        methods = entry["figures"].get("methods", {})
        if methods:
            lines.append("      CAM correlation mean / worst per method: " + ", ".join(
                f"{m} {f['cam_corr_mean']:.4f} / {f['cam_corr_worst']:.4f}" if "cam_corr_mean" in f else f"{m} -"
                for m, f in methods.items()))
    return lines


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    from gradcam_engine.export.api import EXPORT_PRECISIONS, SCORES, ExportOptions
    from gradcam_engine.export.methods import method_names

    ex = sub.add_parser("export", help="export a Keras model as one fused Grad-CAM graph (SavedModel + ONNX)")
    ex.add_argument("model", help="a .keras or .h5 file (Keras 3 or tf_keras), or module.py:function / "
                                  "package.module:function returning a model or a (backbone, head) pair")
    ex.add_argument("--out", required=True, help="artifact directory to create")
    ex.add_argument("--layer", default=default(ExportOptions, "layer"),
                    help="target layer name, nested path (outer/inner), a dict key of a (backbone, head) pair's "
                         "backbone (5), or auto")
    ex.add_argument("--preprocess", default=default(ExportOptions, "preprocessing"), choices=C.PREPROCESSING,
                    help="input scaling built into the graph (caffe: ResNet50/VGG, tf: MobileNet, torch: DenseNet)")
    ex.add_argument("--classes", help="class names: a text file (one per line) or a JSON list")
    ex.add_argument("--opset", type=int, default=default(ExportOptions, "opset"))
    ex.add_argument("--precision", default=default(ExportOptions, "precision"), metavar="LIST",
                    help=f"comma list of {', '.join(EXPORT_PRECISIONS)} (both = fp32,fp16); fp32 is always written "
                         "and every other precision is judged against it by the precision gate")
    ex.add_argument("--calibrate", nargs="+", metavar="INPUT",
                    help="your images (directory, glob, path list, .tar, URI, as `gradcam run` takes): int8 is "
                         "calibrated on them and every reduced precision judged on a held-out quarter")
    ex.add_argument("--calibration-images", type=int, default=default(ExportOptions, "calibration_images"),
                    metavar="N", help="a deterministic sample of at most N of those images")
    ex.add_argument("--keep-failing", action="store_true",
                    help="write a reduced-precision file even when it misses the precision gate (figures recorded)")
    ex.add_argument("--score", default=default(ExportOptions, "score"), choices=SCORES,
                    help="what is differentiated: the class logit (Grad-CAM paper), or the model's output as the "
                         "seed notebook does (the softmax probability)")
    ex.add_argument("--input-size", type=size, help="HxW, for models whose input size is not fixed")
    ex.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                    help="import MODULE first, so a saved model's custom classes resolve (repeatable)")
    ex.add_argument("--methods", default=",".join(default(ExportOptions, "methods")), metavar="M1,M2,...",
                    help=f"CAM methods, comma-separated, in output order (cam = the first): any of "
                         f"{', '.join(method_names())}")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    ex.set_defaults(handler=_export)
