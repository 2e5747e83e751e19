"""Shared fixtures: small test models, each exported once per session, with their per-image Grad-CAM reference.

TensorFlow is imported inside the fixtures, so test files that do not ask for an exported model never load it.
Each model is seeded, the test images are structured scenes (shapes on gradients, not noise) and the class indices
mix -1 (top-1) with explicit non-top-1 classes, so parity is checked on CAMs with real spatial structure.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

# The scenes the benchmarks use: structured, so CAMs have a shape.
from gradcam_engine.bench.measure.images import scene_images

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REFERENCE_BATCH = 8   # images per model with a reference; batches of 1, 3 and 8 are its prefixes
EXPLICIT_SLOTS = (1, 4, 6)  # positions that ask for an explicit (non-top-1) class instead of -1


@dataclass
class ExportedCase:
    """One test model, exported, with what the tests compare it against."""

    name: str
    root: Path                      # the artifact directory
    manifest: dict[str, Any]
    images: np.ndarray              # uint8 [REFERENCE_BATCH, H, W, 3]
    class_index: np.ndarray         # int32 [REFERENCE_BATCH]
    reference: dict[str, np.ndarray]
    reference_fn: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
    target_layer: str               # the layer the test expects export to choose
    final: str | None               # the model's final activation: "softmax", "sigmoid" or None (raw scores)
    preprocessing: str
    num_classes: int
    keras_model: Any = field(repr=False, default=None)

    @functools.cached_property
    def onnx_session(self) -> Any:
        import onnxruntime as ort

        from gradcam_engine.engine import contract as C
        return ort.InferenceSession(str(self.root / C.ONNX_FILE), providers=["CPUExecutionProvider"])

    @functools.cached_property
    def signature(self) -> Any:
        import tensorflow as tf

        from gradcam_engine.engine import contract as C
        return tf.saved_model.load(str(self.root / C.SAVED_MODEL_DIR)).signatures[C.SIGNATURE]

    def run_onnx(self, images: np.ndarray, class_index: np.ndarray) -> dict[str, np.ndarray]:
        from gradcam_engine.engine import contract as C
        names = [o.name for o in self.onnx_session.get_outputs()]
        values = self.onnx_session.run(names, {C.IMAGES: images, C.CLASS_INDEX: class_index})
        return dict(zip(names, values))

    def run_saved_model(self, images: np.ndarray, class_index: np.ndarray) -> dict[str, np.ndarray]:
        import tensorflow as tf
        out = self.signature(images=tf.constant(images), class_index=tf.constant(class_index))
        return {k: v.numpy() for k, v in out.items()}


def _make_case(name: str, root: Path, manifest: dict, model: Any, *, backbone: Callable, head_logits: Callable,
               predict: Callable, preprocess: Callable, size: tuple[int, int], seed: int, target_layer: str,
               final: str | None, preprocessing: str, num_classes: int) -> ExportedCase:
    from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference

    parts = ReferenceParts(preprocess=preprocess, backbone=backbone, head=head_logits, predict=predict)

    def reference_fn(images: np.ndarray, class_index: np.ndarray) -> dict[str, np.ndarray]:
        return gradcam_reference(images, class_index, parts)

    images = scene_images(REFERENCE_BATCH, size, seed)
    top1 = reference_fn(images, np.full(REFERENCE_BATCH, -1, np.int32))["target_class"]
    class_index = np.full(REFERENCE_BATCH, -1, np.int32)
    for slot in EXPLICIT_SLOTS:  # ask for a class other than the model's own choice
        class_index[slot] = (top1[slot] + 1) % num_classes
    return ExportedCase(name=name, root=root, manifest=manifest, images=images, class_index=class_index,
                        reference=reference_fn(images, class_index), reference_fn=reference_fn,
                        target_layer=target_layer, final=final, preprocessing=preprocessing,
                        num_classes=num_classes, keras_model=model)


def _pre_activation(dense: Any) -> Callable:
    """The logit a softmax (or sigmoid) Dense layer turns into probabilities: its pre-activation, computed here by
    hand."""
    import tensorflow as tf
    return lambda h: tf.matmul(h, dense.kernel) + dense.bias


def _calibrate_batch_norm(model: Any, size: tuple[int, int], preprocess: Callable, seed: int) -> None:
    """Set every BatchNormalization's moving statistics to those of real inputs (one training-mode pass, momentum 0).

    Freshly initialised, they are (0, 1) whatever the layer sees, and a deep network's activations shrink layer after
    layer: MobileNetV2's feature maps came out near 1e-12 and its softmax a three-way tie at float precision, where
    identical top-1 classes and relative comparisons prove nothing. The inputs mix scenes with uniform noise (what
    export's own check feeds), as a trained network's statistics cover more than one kind of image; statistics of
    smooth scenes alone make noise blow activations up to ~1e3."""
    import keras

    def layers(m: Any) -> list[Any]:
        return [x for layer in m.layers for x in (layers(layer) if isinstance(layer, keras.Model) else [layer])]

    noise = np.random.default_rng(seed).integers(0, 256, (16, *size, 3)).astype(np.float32)
    inputs = preprocess(np.concatenate([scene_images(16, size, seed).astype(np.float32), noise]))
    norms = [layer for layer in layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(inputs, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def resnet50_case(artifacts_dir: Path) -> ExportedCase:
    """The seed's shape: ResNet50 + GlobalAveragePooling2D + Dropout + Dense(2) logits, saved as .keras, caffe."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(11)
    size = (96, 96)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(*size, 3))
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(base.output)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    out = keras.layers.Dense(2, name="dense")(x)
    model = keras.Model(base.input, out, name="resnet50_cats_dogs")
    path = artifacts_dir / "resnet50_cats_dogs.keras"
    model.save(path)
    root = artifacts_dir / "resnet50"
    manifest = export_artifact(str(path), root, ExportOptions(preprocessing="caffe", class_names=["cat", "dog"]))

    backbone = keras.Model(model.input, model.get_layer("conv5_block3_out").output)
    gap, dropout, dense = (model.get_layer(n) for n in ("global_average_pooling2d", "dropout", "dense"))
    return _make_case(
        "resnet50_seed", root, manifest, model, backbone=lambda x: backbone(x, training=False),
        head_logits=lambda fm: dense(dropout(gap(fm), training=False)),
        predict=lambda x: model(x, training=False), preprocess=keras.applications.resnet50.preprocess_input,
        size=size, seed=101, target_layer="conv5_block3_out", final=None, preprocessing="caffe", num_classes=2)


@pytest.fixture(scope="session")
def nested_mobilenet_case(artifacts_dir: Path) -> ExportedCase:
    """MobileNetV2 used as one layer of a functional model, + GAP + Dense(3, softmax); layer found automatically."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(22)
    size = (96, 96)
    mobilenet = keras.applications.MobileNetV2(weights=None, include_top=False, alpha=0.35, input_shape=(*size, 3))
    inputs = keras.Input((*size, 3), name="image")
    x = mobilenet(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, out, name="nested_mobilenet")
    _calibrate_batch_norm(model, size, keras.applications.mobilenet_v2.preprocess_input, seed=2222)
    root = artifacts_dir / "nested_mobilenet"
    manifest = export_artifact(model, root, ExportOptions(layer="auto", preprocessing="tf"))

    gap, dense = model.get_layer("pool"), model.get_layer("classes")
    return _make_case(
        "nested_mobilenet", root, manifest, model, backbone=lambda x: mobilenet(x, training=False),
        head_logits=lambda fm: _pre_activation(dense)(gap(fm)), predict=lambda x: model(x, training=False),
        preprocess=keras.applications.mobilenet_v2.preprocess_input, size=size, seed=202,
        target_layer=f"{mobilenet.name}/out_relu", final="softmax", preprocessing="tf", num_classes=3)


@pytest.fixture(scope="session")
def small_cnn_case(artifacts_dir: Path) -> ExportedCase:
    """A small CNN whose head is Flatten -> BatchNormalization (non-trivial moving stats) -> Dense(relu) -> Dropout
    -> Dense(4, softmax), on wide images (32x48), so a height/width swap anywhere shows."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(33)
    size = (32, 48)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv3")(x)   # (8, 12, 8)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    out = keras.layers.Dense(4, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, out, name="small_cnn")

    # Moving statistics near the real feature statistics, but not equal to them, and a non-unit gamma/beta:
    # an export that ignored any of the four would give different logits.
    rng = np.random.default_rng(33)
    probe = keras.Model(inputs, model.get_layer("flatten").output)
    feats = np.asarray(probe(keras.applications.densenet.preprocess_input(
        scene_images(32, size, seed=333).astype(np.float32))))
    n = feats.shape[1]
    bn = model.get_layer("head_bn")
    bn.set_weights([rng.uniform(0.5, 2.0, n).astype(np.float32),                           # gamma
                    rng.normal(0.0, 0.3, n).astype(np.float32),                            # beta
                    (feats.mean(0) * rng.uniform(0.7, 1.3, n)).astype(np.float32),         # moving_mean
                    (feats.var(0) * rng.uniform(0.7, 1.5, n) + 0.05).astype(np.float32)])  # moving_variance
    root = artifacts_dir / "small_cnn"
    manifest = export_artifact(model, root, ExportOptions(preprocessing="torch"))

    backbone = keras.Model(inputs, model.get_layer("conv3").output)
    flatten, hidden, dropout, dense = (model.get_layer(n) for n in ("flatten", "hidden", "dropout", "classes"))

    def head_logits(fm: Any) -> Any:
        h = hidden(bn(flatten(fm), training=False))
        return _pre_activation(dense)(dropout(h, training=False))

    return _make_case(
        "small_cnn_bn", root, manifest, model, backbone=lambda x: backbone(x, training=False),
        head_logits=head_logits, predict=lambda x: model(x, training=False),
        preprocess=keras.applications.densenet.preprocess_input, size=size, seed=303, target_layer="conv3",
        final="softmax", preprocessing="torch", num_classes=4)


@pytest.fixture(scope="session")
def efficientnet_case(artifacts_dir: Path) -> ExportedCase:
    """EfficientNetB0 at top level (its own rescaling inside the model, so no preprocessing) + GAP + Dense(5,
    softmax)."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(44)
    size = (64, 64)
    base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(*size, 3))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool_head")(base.output)
    out = keras.layers.Dense(5, activation="softmax", name="classes")(x)
    model = keras.Model(base.input, out, name="efficientnet_b0_classifier")
    _calibrate_batch_norm(model, size, lambda x: x, seed=4444)
    root = artifacts_dir / "efficientnet"
    manifest = export_artifact(model, root, ExportOptions(preprocessing="none"))

    backbone = keras.Model(model.input, model.get_layer("top_activation").output)
    gap, dense = model.get_layer("avg_pool_head"), model.get_layer("classes")
    return _make_case(
        "efficientnet_b0", root, manifest, model, backbone=lambda x: backbone(x, training=False),
        head_logits=lambda fm: _pre_activation(dense)(gap(fm)), predict=lambda x: model(x, training=False),
        preprocess=keras.applications.efficientnet.preprocess_input, size=size, seed=404,
        target_layer="top_activation", final="softmax", preprocessing="none", num_classes=5)


@pytest.fixture(scope="session")
def pair_case(artifacts_dir: Path) -> ExportedCase:
    """The seed notebook's form: a backbone returning a dict of levels {"4", "5"} and the head as a list of layers;
    tall images (96x64)."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(55)
    size = (96, 64)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    level4 = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="block4")(x)   # 24x16
    level5 = keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="relu", name="block5")(level4)  # 12x8
    backbone = keras.Model(inputs, {"4": level4, "5": level5}, name="cnn_backbone")
    gap = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")
    dropout = keras.layers.Dropout(0.5, name="dropout")
    dense = keras.layers.Dense(2, activation="softmax", name="dense")
    image = keras.Input((*size, 3))
    model = keras.Model(image, dense(dropout(gap(backbone(image)["5"]))), name="seed_pair")  # builds the head
    root = artifacts_dir / "pair"
    manifest = export_artifact((backbone, [gap, dropout, dense]), root,
                               ExportOptions(layer="5", input_size=size, preprocessing="tf"))

    return _make_case(
        "pair_dict_backbone", root, manifest, model, backbone=lambda x: backbone(x, training=False)["5"],
        head_logits=lambda fm: _pre_activation(dense)(dropout(gap(fm), training=False)),
        predict=lambda x: model(x, training=False), preprocess=keras.applications.mobilenet_v2.preprocess_input,
        size=size, seed=505, target_layer="5", final="softmax", preprocessing="tf", num_classes=2)


@pytest.fixture(scope="session")
def max_pool_head_case(artifacts_dir: Path) -> ExportedCase:
    """Head rules, one model: GlobalMaxPooling2D over a clipped ReLU (so maxima tie and share their gradient) ->
    Dense(tanh) -> ReLU layer -> Dense -> Activation("sigmoid") layer -> Dense -> a Softmax layer; wide images."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(69)
    size = (40, 56)
    L = keras.layers
    inputs = keras.Input((*size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(12, 3, padding="same", name="conv2")(x)
    x = L.ReLU(max_value=0.25, name="clipped")(x)                     # (20, 28, 12); saturated cells tie
    x = L.GlobalMaxPooling2D(name="max_pool")(x)
    x = L.Dense(16, activation="tanh", name="dense_tanh")(x)
    x = L.ReLU(name="relu_layer")(x)
    x = L.Dense(12, name="dense_linear")(x)
    x = L.Activation("sigmoid", name="sigmoid_layer")(x)
    logits = L.Dense(4, name="logits")(x)
    out = L.Softmax(name="softmax_layer")(logits)
    model = keras.Model(inputs, out, name="max_pool_head")
    root = artifacts_dir / "max_pool_head"
    manifest = export_artifact(model, root, ExportOptions(preprocessing="tf"))

    backbone = keras.Model(inputs, model.get_layer("clipped").output)
    head = keras.Model(model.get_layer("clipped").output, logits)   # Keras' own layers, TensorFlow's autodiff
    return _make_case(
        "max_pool_head", root, manifest, model, backbone=lambda x: backbone(x, training=False),
        head_logits=lambda fm: head(fm, training=False), predict=lambda x: model(x, training=False),
        preprocess=keras.applications.mobilenet_v2.preprocess_input, size=size, seed=606, target_layer="clipped",
        final="softmax", preprocessing="tf", num_classes=4)


@pytest.fixture(scope="session")
def keepdims_head_case(artifacts_dir: Path) -> ExportedCase:
    """Head rules, another model: GlobalAveragePooling2D(keepdims=True) -> Dense(sigmoid) on the 4-D map -> Flatten
    -> Dense(tanh) -> Dense(3, sigmoid) as the final activation (multi-label scores); tall images."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(77)
    size = (48, 32)
    L = keras.layers
    inputs = keras.Input((*size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)  # (24, 16, 16)
    x = L.GlobalAveragePooling2D(keepdims=True, name="pool_keepdims")(x)      # (1, 1, 16): 4-D, so name the layer
    x = L.Dense(10, activation="sigmoid", name="dense_sigmoid_4d")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(6, activation="tanh", name="dense_tanh")(x)
    final = L.Dense(3, activation="sigmoid", name="multi_label")
    model = keras.Model(inputs, final(x), name="keepdims_head")
    root = artifacts_dir / "keepdims_head"
    manifest = export_artifact(model, root, ExportOptions(layer="features", preprocessing="torch"))

    features = model.get_layer("features").output
    backbone = keras.Model(inputs, features)
    before_final = keras.Model(features, final.input)
    return _make_case(
        "keepdims_head", root, manifest, model, backbone=lambda x: backbone(x, training=False),
        head_logits=lambda fm: _pre_activation(final)(before_final(fm, training=False)),
        predict=lambda x: model(x, training=False), preprocess=keras.applications.densenet.preprocess_input,
        size=size, seed=707, target_layer="features", final="sigmoid", preprocessing="torch", num_classes=3)


CASE_FIXTURES = ("resnet50_case", "nested_mobilenet_case", "small_cnn_case", "efficientnet_case", "pair_case",
                 "max_pool_head_case", "keepdims_head_case")


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One small local Ray for the module that asks for it, shut down at its end. A module sets RAY_CPUS to give the
    cluster a CPU count of its own (2 by default)."""
    import ray  # the dev extra installs it: a missing Ray fails here rather than skipping

    ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), object_store_memory=200 << 20,
             include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
