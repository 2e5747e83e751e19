"""The seed notebook's model in miniature, built with tf_keras (Keras 2) as TF Model Garden builds it, and the
notebook's own per-image Grad-CAM to hold its exports to.

`tiny_resnet` stands in for `tfm.vision.backbones.ResNet`: a real tf_keras residual network with BatchNormalization
that returns a dict of levels ({"4", "5"}). The head is the notebook's GlobalAveragePooling2D -> Dropout -> Dense(2),
linear or softmax. Random weights give degenerate CAMs (after ReLU, every weighted map is negative), so the model is
made non-trivial on purpose: BatchNorm statistics are calibrated on scenes, the Dense kernel loses its component
along the mean feature vector (so each class's weighted map has both signs), and the bias puts the decision boundary
in the middle of the widest gap between the test images' logit differences (both classes predicted, no near-ties).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine_support import lively
from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.engine import contract as C

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SIZE = (64, 64)
WIDTH = 16  # not 8: TF 2.21 oneDNN crashes in eager Conv2DBackpropFilter for 1x1 stride-2 convs of 4-8 channels
LEVEL = "5"
PREPROCESSING = "caffe"
BATCH = 8                    # reference images; batches of 1, 3 and 8 are its prefixes
EXPLICIT_SLOTS = (1, 4, 6)   # positions that ask for the other class instead of -1 (top-1)
MIN_MARGIN = 0.1             # |logit 0 - logit 1| of every test image (exports differ by ~1e-5): no near-ties


def tiny_resnet(size: tuple[int, int] = SIZE, width: int = WIDTH) -> Any:
    """A tf_keras ResNet-style backbone returning {"4": (N, 8, 8, 4w), "5": (N, 4, 4, 8w)} at 64x64."""
    import tf_keras

    L = tf_keras.layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, relu: bool = True) -> Any:
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = L.BatchNormalization(epsilon=1e-5, momentum=0.0, name=f"{name}_bn")(x)  # momentum 0: calibrated in 1 step
        return L.ReLU(name=f"{name}_relu")(x) if relu else x

    def block(x: Any, filters: int, stride: int, name: str) -> Any:
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)
        y = conv_bn(conv_bn(x, filters, 3, stride, f"{name}_a"), filters, 3, 1, f"{name}_b", relu=False)
        return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([shortcut, y]))

    image = tf_keras.Input((*size, 3), name="image")
    x = L.MaxPooling2D(3, 2, padding="same", name="stem_pool")(conv_bn(image, width, 5, 2, "stem"))
    levels = {}
    for level, (filters, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 1)], start=2):
        x = block(x, filters, stride, f"l{level}")
        levels[str(level)] = x
    return tf_keras.Model(image, {"4": levels["4"], "5": levels["5"]}, name="tiny_resnet")


def caffe(images: np.ndarray) -> np.ndarray:
    """The reference's preprocessing: keras.applications' own, independent of export/preprocess.py."""
    from keras.applications import imagenet_utils

    return imagenet_utils.preprocess_input(images.astype(np.float32).copy(), mode="caffe")


@dataclass
class GardenModel:
    """The stand-in classifier and its parts, as the notebook holds them."""

    backbone: Any
    gap: Any
    dropout: Any
    dense: Any
    softmax: bool
    model: Any = field(repr=False)  # Input -> backbone(x)["5"] -> gap -> dropout -> dense
    images: np.ndarray = field(repr=False)        # uint8 [BATCH, H, W, 3], the test images
    class_index: np.ndarray = field(repr=False)   # int32 [BATCH]: -1, with the other class at EXPLICIT_SLOTS

    @property
    def head(self) -> list[Any]:
        return [self.gap, self.dropout, self.dense]

    def logits(self, fm: Any) -> Any:
        import tensorflow as tf

        return tf.matmul(self.dropout(self.gap(fm), training=False), self.dense.kernel) + self.dense.bias

    def reference(self, score: str, images: np.ndarray | None = None,
                  class_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The notebook's per-image GradientTape Grad-CAM; score "output" differentiates the model's output
        (the softmax probability) exactly as the notebook does, "logit" the class logit."""
        from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference

        head: Callable[[Any], Any] = (lambda fm: self.dense(self.dropout(self.gap(fm), training=False))) \
            if score == "output" or not self.softmax else self.logits
        parts = ReferenceParts(preprocess=caffe, backbone=lambda x: self.backbone(x, training=False)[LEVEL],
                               head=head, predict=lambda x: self.model(x, training=False))
        return gradcam_reference(self.images if images is None else images,
                                 self.class_index if class_index is None else class_index, parts)


def build(seed: int, softmax: bool) -> GardenModel:
    """A calibrated stand-in classifier (see the module docstring), deterministic for a seed."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    backbone = tiny_resnet()
    L = tf_keras.layers
    gap = L.GlobalAveragePooling2D(name="gap")
    dropout = L.Dropout(0.3, name="drop")
    dense = L.Dense(2, activation="softmax" if softmax else None, name="pred")
    image = tf_keras.Input((*SIZE, 3), name="input_image")
    model = tf_keras.Model(image, dense(dropout(gap(backbone(image)[LEVEL]))), name="garden_standin")

    backbone(caffe(scene_images(32, SIZE, seed + 1)), training=True)  # BatchNorm moving stats := scene stats
    images = scene_images(BATCH, SIZE, seed + 2)
    fm = backbone(caffe(images), training=False)[LEVEL].numpy()       # (N, h, w, C)
    mean = fm.reshape(-1, fm.shape[-1]).mean(0)                       # the mean feature vector
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(fm.shape[-1], 2))
    kernel -= np.outer(mean, mean @ kernel) / (mean @ mean)           # each class map has both signs
    pooled = fm.mean((1, 2)).astype(np.float64)
    diff = pooled @ (kernel[:, 0] - kernel[:, 1])
    kernel *= 2.0 / diff.std()                                        # logit differences of about +-2: no saturation
    diff = pooled @ (kernel[:, 0] - kernel[:, 1])
    order = np.sort(diff)
    k = 1 + int(np.argmax(np.diff(order)[1:BATCH - 2]))               # the widest gap leaving 2+ images per class
    threshold = (order[k] + order[k + 1]) / 2
    dense.set_weights([kernel.astype(np.float32), np.array([-threshold / 2, threshold / 2], np.float32)])

    top1 = np.asarray(model(caffe(images), training=False)).argmax(-1)
    class_index = np.full(BATCH, -1, np.int32)
    class_index[list(EXPLICIT_SLOTS)] = 1 - top1[list(EXPLICIT_SLOTS)]
    return GardenModel(backbone, gap, dropout, dense, softmax, model, images, class_index)


# --- every head rule on tf_keras layers -------------------------------------------------------------------------
RULES_SIZE = (32, 48)  # not square: a height/width swap shows
RULES_BATCH = 3
RULES_CLASSES = 3
RULES_KERNEL_SCALE = 8.0  # on the final Dense: the sigmoid layer's outputs lie in a narrow band, its logits near-tie


@dataclass
class RulesModel:
    """A small tf_keras classifier whose head walks the head rules on tf_keras' own layer classes: ReLU, a pooling
    (GlobalMaxPooling2D, or Flatten after a 4-D BatchNormalization), BatchNormalization with calibrated statistics
    (tf_keras stores its axis as a list), Dense(tanh), Activation("sigmoid") and a final softmax or sigmoid Dense."""

    backbone: Any                                # image -> "features" (N, 8, 12, 12), both signs
    head: list[Any]
    model: Any = field(repr=False)               # the whole classifier (a Sequential when asked for)
    images: np.ndarray = field(repr=False)       # uint8 [RULES_BATCH, H, W, 3]
    class_index: np.ndarray = field(repr=False)  # int32: -1, and the runner-up class at position 1

    def scores(self, score: str) -> Callable[[Any], Any]:
        """What the reference differentiates, computed by the tf_keras layers themselves (TensorFlow's autodiff):
        the final Dense's logit, or with score "output" the Dense's own output (softmax or sigmoid of the logit)."""
        import tensorflow as tf

        *body, final = self.head

        def head(fm: Any) -> Any:
            for layer in body:
                fm = layer(fm, training=False)
            return final(fm) if score == "output" else tf.matmul(fm, final.kernel) + final.bias
        return head

    def reference(self, score: str) -> dict[str, np.ndarray]:
        from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference

        parts = ReferenceParts(preprocess=caffe, backbone=lambda x: self.backbone(x, training=False),
                               head=self.scores(score), predict=lambda x: self.model(x, training=False))
        return gradcam_reference(self.images, self.class_index, parts)


def rules_model(seed: int, pooling: str, final: str, sequential: bool = False) -> RulesModel:
    """A seeded RulesModel: pooling "max" (ReLU -> GlobalMaxPooling2D -> BatchNormalization) or "flatten" (ReLU ->
    BatchNormalization on the 4-D map -> Flatten), then Dense(8, tanh) -> Activation("sigmoid") -> Dense(3, final)."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    L = tf_keras.layers
    convs = [L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1"),
             L.Conv2D(12, 3, strides=2, padding="same", name="features")]  # no activation: the head's ReLU has work
    pool = L.GlobalMaxPooling2D(name="max_pool") if pooling == "max" else L.Flatten(name="flatten")
    norm = L.BatchNormalization(name="bn")
    head = [L.ReLU(name="relu"), *((pool, norm) if pooling == "max" else (norm, pool)),
            L.Dense(8, activation="tanh", name="dense_tanh"), L.Activation("sigmoid", name="sigmoid"),
             L.Dense(RULES_CLASSES, activation=final, name="classes")]
    if sequential:
        model = tf_keras.Sequential([tf_keras.Input((*RULES_SIZE, 3)), *convs, *head], name=f"rules_{pooling}")
        backbone = tf_keras.Model(model.inputs, model.get_layer("features").output)
    else:
        image = tf_keras.Input((*RULES_SIZE, 3))
        backbone = tf_keras.Model(image, convs[1](convs[0](image)), name="rules_backbone")
        x = backbone(image)
        for layer in head:
            x = layer(x)
        model = tf_keras.Model(image, x, name=f"rules_{pooling}")

    # BatchNormalization: moving statistics near the real ones but not equal, gamma and beta not 1 and 0, so an
    # export that ignored any of the four would give other logits.
    rng = np.random.default_rng(seed)
    x = backbone(caffe(scene_images(16, RULES_SIZE, seed + 1)), training=False)
    bn_at = [layer.name for layer in head].index("bn")
    for layer in head[:bn_at]:
        x = layer(x, training=False)
    feats = np.asarray(x).reshape(-1, x.shape[-1])
    n = feats.shape[1]
    head[bn_at].set_weights([rng.uniform(0.5, 2.0, n), rng.normal(0.0, 0.3, n),
                             feats.mean(0) * rng.uniform(0.7, 1.3, n), feats.var(0) * rng.uniform(0.7, 1.5, n) + 0.05])
    kernel, bias = head[-1].get_weights()
    head[-1].set_weights([kernel * RULES_KERNEL_SCALE, bias])

    images = scene_images(RULES_BATCH, RULES_SIZE, seed + 2)
    ranked = np.asarray(model(caffe(images), training=False)).argsort(-1)
    class_index = np.full(RULES_BATCH, -1, np.int32)
    class_index[1] = ranked[1, -2]  # the runner-up: the least likely class may have a flat map
    return RulesModel(backbone, head, model, images, class_index)


def assert_rules_reference_is_non_trivial(rules: RulesModel, ref: dict[str, np.ndarray]) -> None:
    """Every reference CAM a real heatmap, no near-tie between the top two scores, no saturated final activation."""
    live = lively(ref[C.CAM]).tolist()
    assert all(live), f"degenerate reference CAMs: {live}"
    logits = np.sort(np.asarray(rules.scores("logit")(rules.backbone(caffe(rules.images), training=False))), -1)
    assert (logits[:, -1] - logits[:, -2]).min() >= MIN_MARGIN, f"a near-tie between the top classes: {logits}"
    assert 1e-3 < ref[C.PREDICTIONS].max() < 0.999 and ref[C.PREDICTIONS].min() > 1e-3, "a saturated output"


# --- checks shared by the tf_keras tests ------------------------------------------------------------------------
def assert_reference_is_non_trivial(garden: GardenModel, ref: dict[str, np.ndarray]) -> None:
    """Parity on flat CAMs, one predicted class or near-ties would prove nothing."""
    live = lively(ref[C.CAM]).tolist()
    assert sum(live) >= BATCH - 2, f"degenerate reference CAMs: {live}"
    assert any(live[slot] for slot in EXPLICIT_SLOTS), "every explicitly requested class gave a flat CAM"
    top1 = ref[C.PREDICTIONS].argmax(-1)
    assert set(top1.tolist()) == {0, 1}, f"one class predicted for every image: {top1}"
    logits = garden.logits(garden.backbone(caffe(garden.images), training=False)[LEVEL]).numpy()
    assert np.abs(logits[:, 0] - logits[:, 1]).min() >= MIN_MARGIN, "a near-tie between the classes"
    if garden.softmax:
        assert ref[C.PREDICTIONS].max() < 0.999, "a saturated softmax: its gradient vanishes"


def run_onnx(root: Path, images: np.ndarray, class_index: np.ndarray, name: str = C.ONNX_FILE) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(root / name), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {C.IMAGES: images, C.CLASS_INDEX: class_index})))


def run_saved_model(root: Path, images: np.ndarray, class_index: np.ndarray,
                    name: str = C.SAVED_MODEL_DIR) -> dict[str, np.ndarray]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(root / name)).signatures[C.SIGNATURE]
    outputs = signature(images=tf.constant(images), class_index=tf.constant(class_index))
    return {k: v.numpy() for k, v in outputs.items()}


def assert_matches(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """The contract: same target classes, CAM max abs diff within export/parity.py's fp32 tolerance; the gradients
    too, relative to their largest (a pullback off by a factor per image still normalises to the same CAM)."""
    from gradcam_engine.export.parity import TOLERANCES

    np.testing.assert_array_equal(got[C.TARGET_CLASS], ref[C.TARGET_CLASS])
    assert got[C.CAM].shape == ref[C.CAM].shape
    assert float(np.abs(got[C.CAM].astype(np.float64) - ref[C.CAM]).max()) <= TOLERANCES["fp32"]["cam_max_abs_diff"]
    gradients = np.abs(got[C.GRADIENTS].astype(np.float64) - ref[C.GRADIENTS]).max(axis=(1, 2, 3))
    largest = np.abs(ref[C.GRADIENTS]).max(axis=(1, 2, 3))
    assert (gradients <= TOLERANCES["fp32"]["cam_max_abs_diff"] * largest).all(), (gradients, largest)
    scale = max(1.0, float(np.abs(ref[C.TARGET_SCORE]).max()))
    assert float(np.abs(got[C.TARGET_SCORE] - ref[C.TARGET_SCORE]).max()) <= 1e-4 * scale
    np.testing.assert_allclose(got[C.PREDICTIONS], ref[C.PREDICTIONS], rtol=1e-4, atol=1e-5)


def assert_parity(root: Path, ref: dict[str, np.ndarray], garden: GardenModel, batches: tuple[int, ...] = (1, 3, 8),
                  saved_model: bool = True) -> None:
    """ONNX Runtime (and the SavedModel) against the reference, on prefixes of the test images."""
    for n in batches:
        images, class_index = garden.images[:n], garden.class_index[:n]
        expected = {k: v[:n] for k, v in ref.items()}
        assert_matches(run_onnx(root, images, class_index), expected)
        if saved_model:
            assert_matches(run_saved_model(root, images, class_index), expected)
