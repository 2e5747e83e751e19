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
