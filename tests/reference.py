"""The Grad-CAM reference the exported graphs are checked against: the seed's algorithm, one image at a time.

Deliberately independent of export/: no shared preprocessing, no hand-written head gradients, no batching. Each
image goes through the model parts under a `tf.GradientTape` exactly as the Grad-CAM overview does it, and
TensorFlow's own autodiff gives the gradient of the class score with respect to the target feature maps.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

Array = np.ndarray


def gradcam_reference(
    images: Array,
    class_index: Array,
    *,
    preprocess: Callable[[Array], Any],
    backbone: Callable[[tf.Tensor], tf.Tensor],
    head_logits: Callable[[tf.Tensor], tf.Tensor],
    predict: Callable[[tf.Tensor], tf.Tensor],
) -> dict[str, Array]:
    """Per-image Grad-CAM of uint8 RGB `images` [N, H, W, 3].

    preprocess:  float32 RGB [1, H, W, 3] in 0..255 -> the model's input (a keras.applications preprocess_input)
    backbone:    model input -> target feature maps [1, h, w, C]
    head_logits: feature maps -> the scores to differentiate [1, K] (the pre-activation of a final softmax)
    predict:     model input -> the model's own output [1, K]
    class_index: int [N]; -1 takes the model's top-1 class

    Returns numpy arrays named as the exported graph's outputs: predictions [N, K], target_class [N],
    target_score [N], feature_maps [N, h, w, C], gradients [N, h, w, C], cam [N, h, w].
    """
    rows: dict[str, list[Array]] = {k: [] for k in
                                    ("predictions", "target_class", "target_score", "feature_maps", "gradients", "cam")}
    for i in range(len(images)):
        x = tf.convert_to_tensor(np.asarray(preprocess(images[i:i + 1].astype(np.float32).copy()), np.float32))
        prediction = np.asarray(predict(x))[0]
        class_idx = int(class_index[i]) if int(class_index[i]) >= 0 else int(np.argmax(prediction))

        with tf.GradientTape() as tape:
            tape.watch(x)
            feature_maps = backbone(x)                  # (1, h, w, C)
            tape.watch(feature_maps)
            logits = head_logits(feature_maps)          # (1, K)
            class_score = logits[:, class_idx]
        grads = tape.gradient(class_score, feature_maps)

        weights = tf.reduce_mean(grads, axis=(0, 1, 2))                        # (C,)
        cam = tf.reduce_mean(feature_maps[0] * weights, axis=-1).numpy()       # (h, w)
        peak = float(np.max(cam))
        if peak > 0:
            cam = cam / peak
            cam[cam < 0] = 0.0
        else:                                                                  # nothing contributes positively
            cam = np.zeros_like(cam)

        rows["predictions"].append(prediction)
        rows["target_class"].append(np.int32(class_idx))
        rows["target_score"].append(np.float32(class_score.numpy()[0]))
        rows["feature_maps"].append(feature_maps.numpy()[0])
        rows["gradients"].append(grads.numpy()[0])
        rows["cam"].append(cam.astype(np.float32))
    return {k: np.stack(v) for k, v in rows.items()}
