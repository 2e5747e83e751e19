"""The fused Grad-CAM graph: one tf.function from uint8 images to predictions, gradients and CAMs."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf

from gradcam_engine.engine import contract as C
from gradcam_engine.export.head import CallableHead, KerasHead
from gradcam_engine.export.methods import cam_maps
from gradcam_engine.export.preprocess import preprocess


class FusedGradCAM(tf.Module):
    """Holds the model parts (so a SavedModel tracks their weights) and the one fused function."""

    def __init__(self, backbone: Callable[[tf.Tensor], Any], head: KerasHead | CallableHead,
                 input_size: tuple[int, int], preprocessing: str, feature_key: str | None = None,
                 tracked: list[Any] | None = None, jit_compile: bool = False,
                 methods: Sequence[str] = (C.DEFAULT_METHOD,)):
        super().__init__(name="gradcam")
        self.backbone = backbone
        self.head = head
        trackable = tf.__internal__.tracking.Trackable
        self.tracked = [t for t in [*(tracked or []), *getattr(head, "layers", [])] if isinstance(t, trackable)]
        self._feature_key = feature_key
        self._preprocessing = preprocessing
        self._methods = tuple(methods)
        h, w = input_size
        self.gradcam = tf.function(self._gradcam, jit_compile=jit_compile or None, input_signature=[
            tf.TensorSpec([None, h, w, 3], tf.uint8, name=C.IMAGES),
            tf.TensorSpec([None], tf.int32, name=C.CLASS_INDEX),
        ])

    def _gradcam(self, images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        # Name scopes let the fp16 conversion find the backbone (contract.FP16_SCOPE); the rest stays float32.
        with tf.name_scope("preprocess"):
            x = preprocess(images, self._preprocessing)      # (N, H, W, 3) float32
        with tf.name_scope(C.FP16_SCOPE.rstrip("/")):
            fm = self.backbone(x, training=False) if hasattr(self.backbone, "layers") else self.backbone(x)
            if self._feature_key is not None:                 # a backbone returning a dict of levels
                fm = fm[self._feature_key]
        with tf.name_scope("head"):
            out = self.head(fm)                               # predictions (N, K), logits (N, K)
            top1 = tf.argmax(out.predictions, axis=-1, output_type=tf.int32)
            target = tf.where(class_index < 0, top1, class_index)  # (N,)
            num_classes = out.logits.shape[-1] or tf.shape(out.logits)[-1]  # static when known: a constant OneHot depth
            onehot = tf.one_hot(target, num_classes, dtype=out.logits.dtype)  # d score / d logits
            score = tf.reduce_sum(out.logits * onehot, axis=-1)  # (N,)
            grads = out.pullback(onehot)                      # (N, h, w, C)
        with tf.name_scope("cam"):  # every method's map, from the same feature maps and gradients
            maps = cam_maps(tf.cast(fm, tf.float32), tf.cast(grads, tf.float32), self._methods)  # M x (N, h, w)
            cams = tf.stack(maps, axis=1)                     # (N, M, h, w)

        def f32(t: tf.Tensor, name: str) -> tf.Tensor:
            return tf.identity(tf.cast(t, tf.float32) if t.dtype.is_floating else t, name=name)
        return {
            C.PREDICTIONS: f32(out.predictions, C.PREDICTIONS),
            C.TARGET_CLASS: f32(target, C.TARGET_CLASS),
            C.TARGET_SCORE: f32(score, C.TARGET_SCORE),
            C.FEATURE_MAPS: f32(fm, C.FEATURE_MAPS),
            C.GRADIENTS: f32(grads, C.GRADIENTS),
            C.CAM: f32(maps[0], C.CAM),
            C.CAMS: f32(cams, C.CAMS),
        }
