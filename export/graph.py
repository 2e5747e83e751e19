"""The fused Grad-CAM graph: one tf.function from uint8 images to predictions, gradients and CAMs."""
from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from engine import contract as C
from export.head import CallableHead, KerasHead
from export.preprocess import preprocess


def gradcam_map(feature_maps: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """The seed's Grad-CAM, batched: channel weights from pooled gradients, weighted channel mean, ReLU, max-norm."""
    weights = tf.reduce_mean(gradients, axis=[1, 2])                               # (N, C)
    cam = tf.reduce_mean(feature_maps * weights[:, tf.newaxis, tf.newaxis, :], -1)  # (N, h, w)
    cam = tf.nn.relu(cam)
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)                          # (N, 1, 1)
    safe = tf.where(peak > 0, peak, tf.ones_like(peak))
    return tf.where(peak > 0, cam / safe, tf.zeros_like(cam))                      # 0 where the map is all <= 0


class FusedGradCAM(tf.Module):
    """Holds the model parts (so a SavedModel tracks their weights) and the one fused function."""

    def __init__(self, backbone: Callable[[tf.Tensor], Any], head: KerasHead | CallableHead,
                 input_size: tuple[int, int], preprocessing: str, feature_key: str | None = None,
                 tracked: list[Any] | None = None):
        super().__init__(name="gradcam")
        self.backbone = backbone
        self.head = head
        trackable = tf.__internal__.tracking.Trackable
        self.tracked = [t for t in [*(tracked or []), *getattr(head, "layers", [])] if isinstance(t, trackable)]
        self._feature_key = feature_key
        self._preprocessing = preprocessing
        h, w = input_size
        self.gradcam = tf.function(self._gradcam, input_signature=[
            tf.TensorSpec([None, h, w, 3], tf.uint8, name=C.IMAGES),
            tf.TensorSpec([None], tf.int32, name=C.CLASS_INDEX),
        ])

    def _gradcam(self, images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        x = preprocess(images, self._preprocessing)          # (N, H, W, 3) float32
        fm = self.backbone(x, training=False) if hasattr(self.backbone, "layers") else self.backbone(x)
        if self._feature_key is not None:                     # a backbone returning a dict of levels
            fm = fm[self._feature_key]
        out = self.head(fm)                                   # predictions (N, K), logits (N, K)
        top1 = tf.argmax(out.predictions, axis=-1, output_type=tf.int32)
        target = tf.where(class_index < 0, top1, class_index)  # (N,)
        onehot = tf.one_hot(target, tf.shape(out.logits)[-1], dtype=out.logits.dtype)  # (N, K); d score / d logits
        score = tf.reduce_sum(out.logits * onehot, axis=-1)   # (N,)
        grads = out.pullback(onehot)                          # (N, h, w, C)
        return {
            C.PREDICTIONS: tf.identity(out.predictions, name=C.PREDICTIONS),
            C.TARGET_CLASS: tf.identity(target, name=C.TARGET_CLASS),
            C.TARGET_SCORE: tf.identity(score, name=C.TARGET_SCORE),
            C.FEATURE_MAPS: tf.identity(fm, name=C.FEATURE_MAPS),
            C.GRADIENTS: tf.identity(grads, name=C.GRADIENTS),
            C.CAM: tf.identity(gradcam_map(fm, grads), name=C.CAM),
        }
