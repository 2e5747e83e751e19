"""`gradcam`: a thin command line. Each subcommand parses, builds its options, calls one function, prints a summary."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up chatter on stderr (oneDNN, CUDA probing), which ignores log levels;
    if the import fails, what it printed is shown after all."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _export(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    from export import ExportOptions, export_artifact, read_class_names

    options = ExportOptions(
        layer=args.layer, preprocessing=args.preprocess, opset=args.opset, precision=args.precision,
        class_names=read_class_names(args.classes) if args.classes else None,
        input_size=_size(args.input_size) if args.input_size else None, overwrite=args.overwrite)
    manifest = export_artifact(args.model, args.out, options)
    cam = manifest["cam"]
    sizes = ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" for k, v in _grouped_sizes(manifest).items())
    print(f"exported {manifest['model_name']} -> {args.out}: layer {manifest['target_layer']} "
          f"(cam {cam['height']}x{cam['width']}x{cam['channels']}), score {manifest['score']}, "
          f"{manifest['num_classes']} classes, opset {manifest['opset']}; {sizes}")
    for file, check in manifest["verification"].items():
        if isinstance(check, dict):
            print(f"  {file} ({check['precision']}) vs TensorFlow fp32: cam max diff {check['cam_max_abs_diff']:.1e}, "
                  f"cam correlation >= {check['cam_min_correlation']:.4f}, top-1 agreement {check['top1_agreement']:.0%}")
        else:
            print(f"  {file}: {check}")
    return 0


def _grouped_sizes(manifest: dict) -> dict[str, dict[str, int]]:
    groups: dict[str, dict[str, int]] = {}
    for rel, meta in manifest["files"].items():
        top = rel.split("/")[0]
        groups.setdefault(top, {"bytes": 0})["bytes"] += meta["bytes"]
    return groups


def build_parser() -> argparse.ArgumentParser:
    """The full command line, one subparser per job."""
    parser = argparse.ArgumentParser(prog="gradcam", description="Grad-CAM explanations at dataset scale.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("export", help="export a Keras model as one fused Grad-CAM graph (SavedModel + ONNX)")
    ex.add_argument("model", help="a Keras 3 .keras file")
    ex.add_argument("--out", required=True, help="artifact directory to create")
    ex.add_argument("--layer", default="auto", help="target layer name, nested path (outer/inner) or auto")
    ex.add_argument("--preprocess", default="none", choices=["none", "caffe", "tf", "torch"],
                    help="input scaling built into the graph (caffe: ResNet50/VGG, tf: MobileNet, torch: DenseNet)")
    ex.add_argument("--classes", help="class names: a text file (one per line) or a JSON list")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "both"])
    ex.add_argument("--input-size", help="HxW, for models whose input size is not fixed")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    ex.set_defaults(handler=_export)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here (run, demo, bench) without this file growing an if-chain.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gradcam` command; user errors become one line on stderr and exit code 2."""
    from engine.errors import USER_ERRORS

    _load_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as e:
        print(f"gradcam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradcam {args.command}: interrupted", file=sys.stderr)
        return 130


def _load_extra_commands() -> None:
    if _EXTRA_COMMANDS:
        return
    import importlib

    for module in ("engine.run_cli", "demo.cli", "bench.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        _EXTRA_COMMANDS.append(mod.register)


if __name__ == "__main__":
    sys.exit(main())
