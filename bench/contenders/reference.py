"""The reference: the seed's Grad-CAM, one image at a time under an eager `tf.GradientTape`.

The one reference of the product: the bench times it (the loop the fused graph replaces) and checks every contender
against it, and the tests hold every export to it. Written from the seed's notebook and deliberately independent of
export/: no shared preprocessing (keras.applications' own preprocess_input), no hand-written head gradients (the
model is cut with Keras itself and TensorFlow's autodiff gives the gradient), no batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradcam_engine.bench.errors import BenchError

Array = np.ndarray


@dataclass(frozen=True)
class ReferenceParts:
    """A classifier cut at the target layer, as the seed calls it."""

    preprocess: Callable[[Array], Any]     # float32 RGB 0..255 [1, H, W, 3] -> model input
    backbone: Callable[[Any], Any]         # model input -> feature maps [1, h, w, C]
    head: Callable[[Any], Any]             # feature maps -> the scores differentiated [1, K] (pre-softmax logits)
    activation: Callable[[Any], Any] = lambda z: z  # those scores -> the model's own output (its final softmax)
    predict: Callable[[Any], Any] | None = None      # model input -> the model's output, computed on its own; when
                                                     # None the output comes from the same pass, as in the seed


def keras_preprocess(mode: str) -> Callable[[Array], Array]:
    """The keras.applications preprocess_input of a mode ("none": the model scales its own input)."""
    from keras.applications import imagenet_utils

    if mode == "none":
        return lambda x: x
    return lambda x: imagenet_utils.preprocess_input(x, mode=mode)


def _target_tensor(model: Any, target_layer: str) -> Any:
    """The symbolic output of the target layer; a nested path must end at the nested model's own output."""
    names = [n for n in target_layer.split("/") if n]
    layer = model.get_layer(names[0])
    current = layer
    for name in names[1:]:
        outputs = getattr(current, "outputs", None) or []
        if len(outputs) != 1 or outputs[0]._keras_history.operation.name != name:
            raise BenchError(f"target layer {target_layer!r} is inside nested model {names[0]!r} but is not its "
                             "output; the reference needs a target layer on the model's top level")
        current = outputs[0]._keras_history.operation
    return layer.output


def split_for_reference(model: Any, target_layer: str, preprocessing: str) -> ReferenceParts:
    """Cut a Keras classifier at target_layer; a final softmax/sigmoid is split off so its logit is the score."""
    import keras

    feature_maps = _target_tensor(model, target_layer)
    backbone = keras.Model(model.inputs[0], feature_maps)
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "")
    if isinstance(last, keras.layers.Softmax) or (isinstance(last, keras.layers.Activation) and
                                                  name in ("softmax", "sigmoid")):
        head = keras.Model(feature_maps, last.input)
        final = keras.activations.softmax if isinstance(last, keras.layers.Softmax) else activation
    elif isinstance(last, keras.layers.Dense) and name in ("softmax", "sigmoid"):
        before = keras.Model(feature_maps, last.input)
        head = lambda fm: before(fm, training=False) @ last.kernel + last.bias  # noqa: E731
        final = activation
    else:
        cut = keras.Model(feature_maps, model.outputs[0])
        head = lambda fm: cut(fm, training=False)  # noqa: E731
        final = lambda z: z  # noqa: E731
    return ReferenceParts(keras_preprocess(preprocessing), lambda x: backbone(x, training=False), head, final)


def gradcam_reference(images: Array, class_index: Array, parts: ReferenceParts) -> dict[str, Array]:
    """Per-image Grad-CAM of uint8 RGB images [N, H, W, 3]; class_index -1 takes the model's top-1 class.

    Returns numpy arrays named as the exported graph's outputs: predictions [N, K], target_class [N],
    target_score [N], feature_maps [N, h, w, C], gradients [N, h, w, C], cam [N, h, w].
    """
    import tensorflow as tf

    names = ("predictions", "target_class", "target_score", "feature_maps", "gradients", "cam")
    rows: dict[str, list[Array]] = {k: [] for k in names}
    for i in range(len(images)):
        x = tf.convert_to_tensor(np.asarray(parts.preprocess(images[i:i + 1].astype(np.float32).copy()), np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            feature_maps = parts.backbone(x)                       # (1, h, w, C)
            tape.watch(feature_maps)
            logits = parts.head(feature_maps)                      # (1, K)
            prediction = np.asarray(parts.predict(x) if parts.predict else parts.activation(logits))[0]
            wanted = int(class_index[i])
            class_idx = wanted if wanted >= 0 else int(np.argmax(prediction))
            class_score = logits[:, class_idx]
        grads = tape.gradient(class_score, feature_maps)           # (1, h, w, C)

        weights = tf.reduce_mean(grads, axis=(0, 1, 2))                        # (C,)
        cam = tf.reduce_mean(feature_maps[0] * weights, axis=-1).numpy()       # (h, w)
        peak = float(np.max(cam))
        cam = np.maximum(cam / peak, 0.0) if peak > 0 else np.zeros_like(cam)  # nothing contributes: all zero

        rows["predictions"].append(prediction)
        rows["target_class"].append(np.int32(class_idx))
        rows["target_score"].append(np.float32(class_score.numpy()[0]))
        rows["feature_maps"].append(feature_maps.numpy()[0])
        rows["gradients"].append(grads.numpy()[0])
        rows["cam"].append(cam.astype(np.float32))
    return {k: np.stack(v) for k, v in rows.items()}


# --- every CAM method, in numpy, from the reference's feature maps and gradients ----------------------------------
# Written from the formulas (pytorch-grad-cam 1.5.7's), independently of export/methods.py: float64, per-image SVD
# instead of power iteration, the papers' plain rules instead of the graph's guards. A [N, h, w, C], G likewise.
def _gradcampp(A: Array, G: Array) -> Array:
    g2, g3 = G ** 2, G ** 3
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = g2 / (2 * g2 + A.sum(axis=(1, 2), keepdims=True) * g3 + 1e-6)
    alpha = np.where(G != 0, alpha, 0.0)
    return np.einsum("nhwc,nc->nhw", A, (np.maximum(G, 0) * alpha).sum(axis=(1, 2)))


def _xgradcam(A: Array, G: Array) -> Array:
    weights = (G * A / (A.sum(axis=(1, 2), keepdims=True) + 1e-7)).sum(axis=(1, 2))
    return np.einsum("nhwc,nc->nhw", A, weights)


def _eigencam(A: Array, G: Array) -> Array:
    maps = []
    for a in A:
        x = a.reshape(-1, a.shape[-1])
        x = x - x.mean(axis=0)                                     # channel-centred
        projection = x @ np.linalg.svd(x, full_matrices=False)[2][0]  # on the first right singular vector
        total = a.sum(axis=-1).reshape(-1)
        if projection @ (total - total.mean()) < 0:                # SVD's sign is arbitrary: follow sum_c A
            projection = -projection
        maps.append(projection.reshape(a.shape[:2]))
    return np.stack(maps)


METHOD_FORMULAS: dict[str, Callable[[Array, Array], Array]] = {
    "gradcam": lambda A, G: np.einsum("nhwc,nc->nhw", A, G.mean(axis=(1, 2))),
    "gradcampp": _gradcampp,
    "xgradcam": _xgradcam,
    "hirescam": lambda A, G: (G * A).sum(axis=-1),
    "layercam": lambda A, G: (np.maximum(G, 0) * A).sum(axis=-1),
    "eigencam": _eigencam,
}


def normalise_maps(raw: Array) -> Array:
    """Raw maps [N, h, w] as every method ends: ReLU, then / per-image max (0 where the max is 0), in float64."""
    cam = np.maximum(np.asarray(raw, np.float64), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)


def reference_maps(feature_maps: Array, gradients: Array, methods: tuple[str, ...] | list[str]) -> Array:
    """Every method's map [N, M, h, w] from per-image feature maps and gradients: ReLU, then / per-image max."""
    A, G = feature_maps.astype(np.float64), gradients.astype(np.float64)
    return np.stack([normalise_maps(METHOD_FORMULAS[name](A, G)) for name in methods], axis=1)
