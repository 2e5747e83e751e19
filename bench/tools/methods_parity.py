"""Every CAM method's parity figures: the exported graph, in ONNX Runtime and as a SavedModel, against the numpy
formulas computed from the per-image GradientTape reference's feature maps and gradients.

`python -m gradcam_engine.bench.tools.methods_parity [--batches 1 3 8] [--json FILE]` exports three small seeded
models with all the registered methods and prints the max abs diff per model, runtime, batch size and method. The
models are the ones tests/test_cam_methods.py holds to its bounds (1e-4, Eigen-CAM 1e-3): a Flatten -> Dense(relu)
-> Dense head (gradients that vary over the grid), a GAP head on a 20x20 grid (Eigen-CAM's Gram matrix on the
channels side) and a GAP head with more channels than cells (the cells side, as ResNet50's 7x7x2048). Every image is
run once per batch size (the images in consecutive batches of that size); some ask for a class other than the top-1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradcam_engine.engine import contract as C

Head = Callable[[Any], Any]  # target layer's feature maps -> the scores differentiated (pre-softmax logits)


@dataclass
class MethodsCase:
    """A small model exported with CAM methods, and what the formulas say its maps must be."""

    name: str
    root: Path
    manifest: dict[str, Any]
    methods: tuple[str, ...]
    images: np.ndarray
    class_index: np.ndarray
    reference: dict[str, np.ndarray]   # the per-image GradientTape reference (feature maps, gradients, cam, ...)
    expected: np.ndarray               # [N, M, h, w] from the numpy formulas
    keras_model: Any = None

    def onnx(self, images: np.ndarray, class_index: np.ndarray, file: str = C.ONNX_FILE) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.root / file), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {C.IMAGES: images, C.CLASS_INDEX: class_index})))

    def saved_model(self, images: np.ndarray, class_index: np.ndarray,
                    folder: str = C.SAVED_MODEL_DIR) -> dict[str, np.ndarray]:
        import tensorflow as tf

        signature = tf.saved_model.load(str(self.root / folder)).signatures[C.SIGNATURE]
        out = signature(**{C.IMAGES: tf.constant(images), C.CLASS_INDEX: tf.constant(class_index)})
        return {k: v.numpy() for k, v in out.items()}


@dataclass(frozen=True)
class SmallModel:
    """A seeded classifier that exports in seconds, the input size of its test images and their seed."""

    build: Callable[[], tuple[Any, Head]]
    size: tuple[int, int]
    seed: int
    gap_head: bool  # the gradient is constant over the grid: HiResCAM and XGrad-CAM reduce to Grad-CAM


def flatten_model() -> tuple[Any, Head]:
    """8x8x12 target grid, head Flatten -> Dense(16, relu) -> Dense(4, softmax): gradients vary over the grid."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(121)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="target")(x)
    flatten, hidden = keras.layers.Flatten(name="flatten"), keras.layers.Dense(16, activation="relu", name="hidden")
    classes = keras.layers.Dense(4, activation="softmax", name="classes")
    model = keras.Model(inputs, classes(hidden(flatten(x))), name="flatten_head")
    return model, lambda fm: tf.matmul(hidden(flatten(fm)), classes.kernel) + classes.bias  # the pre-softmax logit


def gap_model() -> tuple[Any, Head]:
    """20x20x10 target grid (larger than Eigen-CAM's squaring limit), head GAP -> Dense(3) logits."""
    import keras

    keras.utils.set_random_seed(122)
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(10, 3, padding="same", activation="relu", name="target")(x)
    gap, dense = keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(gap(x)), name="gap_head")
    return model, lambda fm: dense(gap(fm))


def cells_model() -> tuple[Any, Head]:
    """6x6x48 target grid, more channels than cells as ResNet50's 7x7x2048, head GAP -> Dense(3) logits."""
    import keras

    keras.utils.set_random_seed(123)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(48, 3, padding="same", activation="relu", name="target")(x)
    gap, dense = keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(gap(x)), name="cells_head")
    return model, lambda fm: dense(gap(fm))


SMALL_MODELS: dict[str, SmallModel] = {
    "flatten": SmallModel(flatten_model, (32, 32), 31, gap_head=False),
    "gap": SmallModel(gap_model, (40, 40), 32, gap_head=True),
    "cells": SmallModel(cells_model, (24, 24), 33, gap_head=True),
}


def build_case(name: str, root: Path, methods: tuple[str, ...], count: int, explicit: tuple[int, ...],
               precision: str = "fp32", keep_failing: bool = False) -> MethodsCase:
    """Export SMALL_MODELS[name] (target layer "target", tf preprocessing) with these methods to root, and compute the
    reference and the formulas' maps for `count` scenes; the `explicit` slots ask for the class after the top-1."""
    import keras

    from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference, reference_maps
    from gradcam_engine.bench.measure.images import scene_images
    from gradcam_engine.export import ExportOptions, export_artifact

    spec = SMALL_MODELS[name]
    model, head = spec.build()
    manifest = export_artifact(model, root, ExportOptions(layer="target", preprocessing="tf", methods=methods,
                                                          precision=precision, keep_failing=keep_failing))
    backbone = keras.Model(model.input, model.get_layer("target").output)
    parts = ReferenceParts(preprocess=keras.applications.mobilenet_v2.preprocess_input,
                           backbone=lambda x: backbone(x, training=False), head=head,
                           predict=lambda x: model(x, training=False))
    images = scene_images(count, spec.size, spec.seed)
    top1 = gradcam_reference(images, np.full(count, -1, np.int32), parts)["target_class"]
    class_index = np.full(count, -1, np.int32)
    num_classes = int(model.output.shape[-1])
    for slot in explicit:
        class_index[slot] = (top1[slot] + 1) % num_classes
    reference = gradcam_reference(images, class_index, parts)
    expected = reference_maps(reference[C.FEATURE_MAPS], reference[C.GRADIENTS], methods)
    return MethodsCase(name, root, manifest, methods, images, class_index, reference, expected, model)


def method_diffs(cams: np.ndarray, expected: np.ndarray) -> list[float]:
    """Max abs diff of each method's maps [N, M, h, w] from the formulas' (float64)."""
    return [float(np.abs(cams[:, i].astype(np.float64) - expected[:, i]).max()) for i in range(expected.shape[1])]


def parity_figures(case: MethodsCase, batches: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """runtime -> batch size -> method -> max abs diff over every image, run in consecutive batches of that size."""
    runs = {"onnx": case.onnx, "saved_model": case.saved_model}
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for runtime, run in runs.items():
        figures[runtime] = {}
        for size in batches:
            worst = np.zeros(len(case.methods))
            for start in range(0, len(case.images), size):
                part = slice(start, start + size)
                got = run(case.images[part], case.class_index[part])
                if not np.array_equal(got[C.TARGET_CLASS], case.reference[C.TARGET_CLASS][part]):
                    raise RuntimeError(f"{case.name} {runtime}: target classes differ from the reference's")
                worst = np.maximum(worst, method_diffs(got[C.CAMS], case.expected[part]))
            figures[runtime][str(size)] = dict(zip(case.methods, map(float, worst)))
    return figures


def table(report: dict[str, Any], methods: tuple[str, ...]) -> str:
    """The figures as a fixed-width table, one row per model, runtime and batch size."""
    lines = [f"{'model':<8} {'runtime':<12} {'batch':>5}  " + "  ".join(f"{m:>9}" for m in methods)]
    for model, by_runtime in report["models"].items():
        for runtime, by_batch in by_runtime["figures"].items():
            for size, by_method in by_batch.items():
                lines.append(f"{model:<8} {runtime:<12} {size:>5}  "
                             + "  ".join(f"{by_method[m]:>9.1e}" for m in methods))
    worst = {m: max(b[m] for r in report["models"].values() for x in r["figures"].values() for b in x.values())
             for m in methods}
    lines.append(f"{'worst':<8} {'':<12} {'':>5}  " + "  ".join(f"{worst[m]:>9.1e}" for m in methods))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and optionally write the figures as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.tools.methods_parity")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import datetime

    import onnxruntime
    import tensorflow as tf

    from gradcam_engine.export.methods import method_names
    from gradcam_engine.export.parity import eigen_gap

    methods, count = method_names(), max(args.batches)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "tensorflow": tf.__version__,
                              "onnxruntime": onnxruntime.__version__, "images": count, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SMALL_MODELS:
            case = build_case(name, Path(tmp) / name, methods, count, explicit=tuple(range(1, count, 2)))
            report["models"][name] = {
                "grid": list(case.reference[C.FEATURE_MAPS].shape[1:]),
                "min_eigen_gap": float(eigen_gap(case.reference[C.FEATURE_MAPS]).min()),
                "figures": parity_figures(case, args.batches)}
    print(table(report, methods))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
