"""Our CAM methods against a peer library's: tf-keras-vis 0.8.7 (Grad-CAM, Grad-CAM++, LayerCAM), on the same models,
images and classes.

`python -m gradcam_engine.bench.tools.peer_check [--images 64] [--json FILE]` needs `pip install tf-keras-vis==0.8.7`
(it brings SciPy, ImageIO and Deprecated, which the product does not need: hence a script, not a test). Two models:
the shipped demo classifier on demo scenes (GAP head, trained) and a seeded CNN whose head is Flatten -> Dense(relu)
-> Dense (gradients that vary over the grid, where the methods differ most). For each, our exported ONNX graph and
the peer run on the same images and classes (the score is the pre-softmax logit on both sides: the peer with
ReplaceToLinear), the peer's raw maps get our normalisation (ReLU, / max), and it prints the max abs difference per
method. Where a method's formula differs between the peers, the peer is also compared with its own formula written
in numpy from the per-image reference's feature maps and gradients, so the difference is shown to be the formula's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("gradcam", "gradcampp", "layercam")


def tf_keras_vis_gradcampp(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """tf-keras-vis 0.8.7's Grad-CAM++ (the paper authors' code): a = G^2 / (2G^2 + sum_hw A G^3), 0 where G = 0,
    then a / sum_hw a per channel; w_c = sum_hw relu(G) a. (Its exp(score) factor cancels in a and in the max-norm.)"""
    g2 = G ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(g2 != 0, g2 / (2 * g2 + A.sum(axis=(1, 2), keepdims=True) * g2 * G), 0.0)
    total = alpha.sum(axis=(1, 2), keepdims=True)
    alpha = alpha / np.where(total == 0, 1.0, total)
    return np.einsum("nhwc,nc->nhw", A, (np.maximum(G, 0) * alpha).sum(axis=(1, 2)))


def _flatten_model() -> Any:
    import keras

    keras.utils.set_random_seed(121)
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1.0)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(24, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="target")(x)
    x = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="classes")(x), name="flatten_head")


def compare_model(model: Any, layer: str, images: np.ndarray, class_index: np.ndarray) -> dict[str, Any]:
    """Ours vs tf-keras-vis on one model: max abs diff per method, and the Grad-CAM++ formula check."""
    import keras
    import onnxruntime as ort
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    from gradcam_engine.bench.contenders.reference import gradcam_reference, normalise_maps, split_for_reference
    from gradcam_engine.engine import contract as C
    from gradcam_engine.export import ExportOptions, export_artifact

    with tempfile.TemporaryDirectory() as tmp:
        export_artifact(model, Path(tmp) / "a", ExportOptions(layer=layer, methods=METHODS))
        session = ort.InferenceSession(str(Path(tmp) / "a" / C.ONNX_FILE), providers=["CPUExecutionProvider"])
        ours = session.run([C.CAMS], {C.IMAGES: images, C.CLASS_INDEX: class_index})[0]
    x = images.astype(np.float32)
    score = CategoricalScore([int(c) for c in class_index])
    peers = {"gradcam": Gradcam, "gradcampp": GradcamPlusPlus, "layercam": Layercam}
    figures: dict[str, Any] = {"images": len(images), "grid": list(ours.shape[2:])}
    peer_maps = {}
    for i, name in enumerate(METHODS):
        explainer = peers[name](keras.models.clone_model(model), model_modifier=ReplaceToLinear(), clone=False)
        explainer.model.set_weights(model.get_weights())
        raw = explainer(score, x, penultimate_layer=layer, seek_penultimate_conv_layer=False, expand_cam=False,
                        normalize_cam=False)  # the layer itself, not the last Conv before it
        peer_maps[name] = normalise_maps(raw)
        figures[f"{name}_max_abs_diff_vs_tf_keras_vis"] = float(np.abs(ours[:, i] - peer_maps[name]).max())
    ref = gradcam_reference(images, class_index, split_for_reference(model, layer, "none"))
    theirs = normalise_maps(tf_keras_vis_gradcampp(ref[C.FEATURE_MAPS].astype(np.float64), ref[C.GRADIENTS]))
    figures["gradcampp_tf_keras_vis_vs_its_formula_in_numpy"] = float(np.abs(peer_maps["gradcampp"] - theirs).max())
    figures["gradcampp_ours_vs_tf_keras_vis_formula_in_numpy"] = float(
        np.abs(ours[:, METHODS.index("gradcampp")] - theirs).max())
    return figures


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the comparison as JSON."""
    parser = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.tools.peer_check")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tf_keras_vis
    except ImportError:
        print("peer_check needs the peer: pip install tf-keras-vis==0.8.7", file=sys.stderr)
        return 2
    import keras

    from gradcam_engine.bench.measure.images import scene_images
    from gradcam_engine.demo.run import MODEL
    from gradcam_engine.demo.scenes import make_scenes

    images, labels, _ = make_scenes(args.images, seed=2027)
    report = {"tf_keras_vis": tf_keras_vis.__version__, "keras": keras.__version__,
              "demo (GAP head, trained)": compare_model(keras.models.load_model(MODEL, compile=False),
                                                        "last_conv_relu", images, labels.astype(np.int32))}
    flatten = _flatten_model()
    scenes = scene_images(args.images, (48, 48), seed=2028)
    targets = np.arange(args.images, dtype=np.int32) % 4  # every class, explained for every image in turn
    report["flatten head (random weights)"] = compare_model(flatten, "target", scenes, targets)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
