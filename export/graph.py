"""The fused Grad-CAM graph: one tf.function from uint8 images to predictions, gradients and CAMs."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import tensorflow as tf

from gradcam_engine.engine import contract as C
from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.frameworks import framework_of
from gradcam_engine.export.head import CallableHead, KerasHead
from gradcam_engine.export.methods import cam_maps
from gradcam_engine.export.preprocess import preprocess


def missing_level(backbone: str, levels: list[str], key: str | None) -> ExportError:
    """The error for a backbone returning a dict of levels when the layer names none of them."""
    return ExportError(f"{backbone} returns a dict of levels {sorted(levels)}; name one with --layer / "
                       f"ExportOptions(layer=...){'' if key is None else f' ({key!r} is not one)'}")


class _Parts:
    """The backbone and head, held where tf.Module does not look: FusedGradCAM chooses what its SavedModel tracks."""

    def __init__(self, backbone: Any, head: Any):
        self.backbone, self.head = backbone, head


def _saved_as_object(obj: Any) -> bool:
    """Whether the SavedModel tracks a model or layer as an object; else only the variables the graph reads."""
    fw = framework_of(obj)
    return fw is None or fw.saved_as_object



class FusedGradCAM(tf.Module):
    """Holds the model parts (so a SavedModel tracks their weights) and the one fused function.

    Keras 3 models and layers are tracked as objects; tf_keras ones only through the variables the traced function
    reads (`concrete_function`), which also covers weights that only a head callable's closure knows.
    """

    def __init__(self, backbone: Callable[[tf.Tensor], Any], head: KerasHead | CallableHead,
                 input_size: tuple[int, int], preprocessing: str, feature_key: str | None = None,
                 tracked: list[Any] | None = None, jit_compile: bool = False,
                 methods: Sequence[str] = (C.DEFAULT_METHOD,)):
        super().__init__(name="gradcam")
        self._parts = _Parts(backbone, head)
        trackable = tf.__internal__.tracking.Trackable
        self.tracked = [t for t in [*(tracked or []), *getattr(head, "layers", [])]
                        if isinstance(t, trackable) and _saved_as_object(t)]
        self._feature_key = feature_key
        self._preprocessing = preprocessing
        self._methods = tuple(methods)
        h, w = input_size
        self.gradcam = tf.function(self._gradcam, jit_compile=jit_compile or None, input_signature=[
            tf.TensorSpec([None, h, w, 3], tf.uint8, name=C.IMAGES),
            tf.TensorSpec([None], tf.int32, name=C.CLASS_INDEX),
        ])

    @property
    def head(self) -> KerasHead | CallableHead:
        """The head the graph differentiates."""
        return self._parts.head

    def concrete_function(self) -> Any:
        """Trace the fused function; everything it reads is then tracked, so the SavedModel holds its weights even
        when only a head callable's closure knows them (a lambda over layers)."""
        concrete = self.gradcam.get_concrete_function()
        self.variables_read = list(concrete.variables)
        return concrete

    def _level(self, fm: Any) -> tf.Tensor:
        """The target feature maps of a backbone that may return a dict of levels (TF Model Garden's)."""
        key = self._feature_key
        if isinstance(fm, dict):
            if key not in fm:
                raise missing_level("the backbone", list(fm), key)
            return fm[key]
        if key is not None:
            raise ExportError(f"the backbone returns one tensor, not a dict of levels, so layer {key!r} names "
                              "nothing in it; leave the layer at auto")
        return fm

    def _gradcam(self, images: tf.Tensor, class_index: tf.Tensor) -> dict[str, tf.Tensor]:
        # Name scopes let the fp16 conversion find the backbone (contract.FP16_SCOPE); the rest stays float32.
        with tf.name_scope("preprocess"):
            x = preprocess(images, self._preprocessing)      # (N, H, W, 3) float32
        with tf.name_scope(C.FP16_SCOPE.rstrip("/")):
            backbone = self._parts.backbone
            fm = backbone(x, training=False) if hasattr(backbone, "layers") else backbone(x)
            fm = self._level(fm)
        with tf.name_scope("head"):
            out = self._parts.head(fm)                        # predictions (N, K), scores (N, K)
            top1 = tf.argmax(out.predictions, axis=-1, output_type=tf.int32)
            target = tf.where(class_index < 0, top1, class_index)  # (N,)
            num_classes = out.scores.shape[-1] or tf.shape(out.scores)[-1]  # static when known: a constant OneHot depth
            onehot = tf.one_hot(target, num_classes, dtype=out.scores.dtype)  # d score / d scores
            score = tf.reduce_sum(out.scores * onehot, axis=-1)  # (N,)
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
