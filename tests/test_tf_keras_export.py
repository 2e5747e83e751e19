"""tf_keras (Keras 2) models, as TF Model Garden builds them, export from Python like Keras 3 ones.

The stand-in (tests/tf_keras_models.py) is the seed notebook's model in miniature: a tf_keras ResNet-style backbone
returning a dict of levels, and a tf_keras GlobalAveragePooling2D -> Dropout -> Dense(2) head, linear or softmax.
Every export is held to the notebook's own per-image GradientTape Grad-CAM: same target classes, CAM max abs diff
within export/parity.py's fp32 tolerance, batches of 1, 3 and 8, ONNX Runtime and the SavedModel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tf_keras  # the `dev` extra installs it: a missing tf-keras fails these tests, never skips them

import tf_keras_models as G
from gradcam_engine.engine import contract as C

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def linear() -> G.GardenModel:
    return G.build(seed=3, softmax=False)


@pytest.fixture(scope="module")
def softmax() -> G.GardenModel:
    return G.build(seed=4, softmax=True)


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tf_keras_artifacts")


@pytest.fixture(scope="module")
def readme_pair(linear: G.GardenModel, out_root: Path) -> tuple[Path, dict]:
    """The README's documented call, with tf_keras layers: (backbone, [gap, dropout, dense]), layer "5"."""
    from gradcam_engine.export import ExportOptions, export_artifact

    root = out_root / "readme_pair"
    manifest = export_artifact((linear.backbone, [linear.gap, linear.dropout, linear.dense]), root,
                               ExportOptions(layer="5", input_size=G.SIZE, preprocessing=G.PREPROCESSING))
    return root, manifest


@pytest.fixture(scope="module")
def sequential_output(softmax: G.GardenModel, out_root: Path) -> tuple[Path, dict]:
    """The head as a tf_keras Sequential (never called on an Input), the notebook's score: the probability."""
    from gradcam_engine.export import ExportOptions, export_artifact

    head = tf_keras.Sequential([softmax.gap, softmax.dropout, softmax.dense], name="head")
    root = out_root / "sequential_output"
    manifest = export_artifact((softmax.backbone, head), root,
                               ExportOptions(layer="5", preprocessing=G.PREPROCESSING, score="output"))
    return root, manifest


@pytest.fixture(scope="module")
def readme_garden_call(softmax: G.GardenModel, out_root: Path) -> tuple[Path, dict]:
    """The README's Model Garden call as written there: a list head ending in a softmax Dense, score "output"."""
    from gradcam_engine.export import ExportOptions, export_artifact

    root = out_root / "readme_garden_call"
    manifest = export_artifact((softmax.backbone, [softmax.gap, softmax.dropout, softmax.dense]), root,
                               ExportOptions(layer="5", input_size=G.SIZE, preprocessing="caffe", score="output"))
    return root, manifest


@pytest.fixture(scope="module")
def rules_pair(out_root: Path) -> tuple[G.RulesModel, Path, dict]:
    """Every head rule on tf_keras layers in a (backbone, [layers]) pair: ReLU -> GlobalMaxPooling2D ->
    BatchNormalization -> Dense(tanh) -> Activation("sigmoid") -> Dense(3, softmax), the logit differentiated."""
    from gradcam_engine.export import ExportOptions, export_artifact

    rules = G.rules_model(seed=21, pooling="max", final="softmax")
    root = out_root / "rules_pair"
    return rules, root, export_artifact((rules.backbone, rules.head), root,
                                        ExportOptions(preprocessing=G.PREPROCESSING))


@pytest.fixture(scope="module")
def rules_sequential(out_root: Path) -> tuple[G.RulesModel, Path, dict]:
    """A whole tf_keras Sequential model, the Flatten variant of the head (ReLU -> BatchNormalization on the 4-D map
    -> Flatten -> Dense(tanh) -> Activation("sigmoid") -> Dense(3, sigmoid)), its sigmoid output differentiated."""
    from gradcam_engine.export import ExportOptions, export_artifact

    rules = G.rules_model(seed=22, pooling="flatten", final="sigmoid", sequential=True)
    root = out_root / "rules_sequential"
    return rules, root, export_artifact(rules.model, root, ExportOptions(layer="features",
                                                                         preprocessing=G.PREPROCESSING,
                                                                         score="output"))


@pytest.fixture(scope="module")
def whole_model_both(softmax: G.GardenModel, out_root: Path) -> tuple[Path, dict]:
    """The whole tf_keras classifier object, fp32 and fp16 files."""
    from gradcam_engine.export import ExportOptions, export_artifact

    root = out_root / "whole_model"
    manifest = export_artifact(softmax.model, root, ExportOptions(preprocessing=G.PREPROCESSING, precision="both"))
    return root, manifest


@pytest.fixture(scope="module")
def lambda_head(softmax: G.GardenModel, out_root: Path) -> tuple[Path, dict]:
    """The head as an opaque callable: a lambda over tf_keras layers, whose weights only its closure knows."""
    from gradcam_engine.export import ExportOptions, export_artifact

    s = softmax
    root = out_root / "lambda_head"
    manifest = export_artifact((s.backbone, lambda fm: s.dense(s.dropout(s.gap(fm), training=False))), root,
                               ExportOptions(layer="5", preprocessing=G.PREPROCESSING))
    return root, manifest


# --- the references are worth comparing against -----------------------------------------------------------------
@pytest.mark.parametrize("model, score", [("linear", "logit"), ("softmax", "logit"), ("softmax", "output")])
def test_notebook_reference_is_non_trivial(request: pytest.FixtureRequest, model: str, score: str) -> None:
    garden = request.getfixturevalue(model)
    G.assert_reference_is_non_trivial(garden, garden.reference(score))


@pytest.mark.parametrize("case, score", [("rules_pair", "logit"), ("rules_sequential", "output")])
def test_head_rule_references_are_non_trivial(request: pytest.FixtureRequest, case: str, score: str) -> None:
    rules = request.getfixturevalue(case)[0]
    G.assert_rules_reference_is_non_trivial(rules, rules.reference(score))


def test_score_output_differs_from_the_logit_for_a_softmax_head(softmax: G.GardenModel) -> None:
    """For two classes the probability's gradient points along W0 - W1, not W0: the maps are not the same."""
    logit, output = softmax.reference("logit"), softmax.reference("output")
    np.testing.assert_array_equal(logit[C.TARGET_CLASS], output[C.TARGET_CLASS])
    assert float(np.abs(logit[C.CAM] - output[C.CAM]).max()) > 0.1


# --- parity -------------------------------------------------------------------------------------------------------
def test_documented_pair_call_with_tf_keras_layers_matches_the_notebook(readme_pair, linear) -> None:
    root, manifest = readme_pair
    G.assert_parity(root, linear.reference("logit"), linear)
    assert manifest["target_layer"] == "5" and manifest["framework"] == "tf_keras"
    assert manifest["head"] == ["gap (GlobalAveragePooling2D)", "drop (Dropout)", "pred (Dense)"]
    assert manifest["score"] == "model output" and "tf_keras" in manifest["versions"]


def test_sequential_head_with_score_output_matches_the_notebooks_probability_gradient(sequential_output,
                                                                                     softmax) -> None:
    root, manifest = sequential_output
    ref = softmax.reference("output")
    G.assert_parity(root, ref, softmax)
    assert manifest["score"] == "softmax probability (model output)"
    assert manifest["input"]["height"] == G.SIZE[0]  # read from the backbone: no input_size given
    got = G.run_onnx(root, softmax.images, softmax.class_index)
    picked = got[C.PREDICTIONS][np.arange(G.BATCH), got[C.TARGET_CLASS]]
    np.testing.assert_allclose(got[C.TARGET_SCORE], picked, rtol=1e-5)  # the probability itself


def test_readme_model_garden_call_with_a_softmax_list_head_and_score_output_matches_the_notebook(
        readme_garden_call, softmax) -> None:
    root, manifest = readme_garden_call
    G.assert_parity(root, softmax.reference("output"), softmax)
    assert manifest["score"] == "softmax probability (model output)"
    assert manifest["head"] == ["gap (GlobalAveragePooling2D)", "drop (Dropout)", "pred (Dense)"]


def test_every_head_rule_on_tf_keras_layers_matches_tensorflows_gradient(rules_pair) -> None:
    """The hand-written pullbacks against TensorFlow's autodiff through the tf_keras layers' own calls, at batch 3
    in ONNX Runtime and the SavedModel: CAMs, target scores and the gradients themselves."""
    rules, root, manifest = rules_pair
    G.assert_parity(root, rules.reference("logit"), rules, batches=(G.RULES_BATCH,))
    assert manifest["framework"] == "tf_keras" and manifest["score"] == "pre-softmax logit"
    assert [entry.split(" (")[1][:-1] for entry in manifest["head"]] == [
        "ReLU", "GlobalMaxPooling2D", "BatchNormalization", "Dense", "Activation", "Dense"]


def test_whole_tf_keras_sequential_model_with_a_sigmoid_head_and_score_output_matches_tensorflows_gradient(
        rules_sequential) -> None:
    """Score "output" on a sigmoid head differentiates sigmoid(logit): the reference takes the tf_keras Dense's own
    sigmoid through TensorFlow's autodiff; batches of 1 and 3."""
    rules, root, manifest = rules_sequential
    ref = rules.reference("output")
    G.assert_parity(root, ref, rules, batches=(1, G.RULES_BATCH))
    assert manifest["target_layer"] == "features" and manifest["framework"] == "tf_keras"
    assert manifest["score"] == "sigmoid probability (model output)"
    assert [entry.split(" (")[1][:-1] for entry in manifest["head"]] == [
        "ReLU", "BatchNormalization", "Flatten", "Dense", "Activation", "Dense"]
    picked = ref[C.PREDICTIONS][np.arange(G.RULES_BATCH), ref[C.TARGET_CLASS]]
    np.testing.assert_allclose(ref[C.TARGET_SCORE], picked, rtol=1e-6)  # the reference scored the probability


def test_whole_tf_keras_model_matches_the_notebook(whole_model_both, softmax) -> None:
    root, manifest = whole_model_both
    G.assert_parity(root, softmax.reference("logit"), softmax)
    assert manifest["target_layer"] == "tiny_resnet/l5_out"  # found automatically inside the dict backbone
    assert manifest["score"] == "pre-softmax logit"


def test_whole_tf_keras_model_writes_fp16_onnx_and_a_mixed_precision_saved_model(whole_model_both,
                                                                                softmax) -> None:
    from gradcam_engine.export.parity import cam_correlation

    root, manifest = whole_model_both
    assert manifest["precision"] == {C.SAVED_MODEL_DIR: "fp32", C.ONNX_FILE: "fp32", C.ONNX_FP16_FILE: "fp16",
                                     C.SAVED_MODEL_FP16_DIR: "mixed_float16"}
    full = G.run_onnx(root, softmax.images, softmax.class_index)
    for half in (G.run_onnx(root, softmax.images, softmax.class_index, C.ONNX_FP16_FILE),
                 G.run_saved_model(root, softmax.images, softmax.class_index, C.SAVED_MODEL_FP16_DIR)):
        np.testing.assert_array_equal(half[C.TARGET_CLASS], full[C.TARGET_CLASS])
        assert cam_correlation(full[C.CAM], half[C.CAM]) >= 0.99
        assert float(np.abs(full[C.CAM] - half[C.CAM]).max()) <= 0.05
    assert full[C.CAM].max() > 0.5


def test_mixed_precision_twin_of_a_tf_keras_model_computes_in_float16(softmax) -> None:
    from gradcam_engine.export.mixed import mixed_precision_twin

    twin = mixed_precision_twin(softmax.model)
    convs = [layer for layer in twin.get_layer("tiny_resnet").layers if type(layer).__name__ == "Conv2D"]
    assert convs and all(layer.compute_dtype == "float16" for layer in convs)
    x = G.caffe(softmax.images[:2])
    np.testing.assert_allclose(np.asarray(twin(x, training=False), np.float32),
                               np.asarray(softmax.model(x, training=False)), atol=0.02)


def test_mixed_precision_twin_rebuilds_a_backbone_made_from_its_constructor_arguments() -> None:
    """A Model Garden backbone's config is its constructor's arguments (no per-layer dtypes): its layers are built
    again under the mixed policy."""
    from gradcam_engine.export.mixed import mixed_precision_twin

    class ConfigBackbone(tf_keras.Model):  # the pattern of tfm.vision.backbones.ResNet
        def __init__(self, width: int = 4, **kwargs):
            image = tf_keras.Input((16, 16, 3))
            super().__init__(inputs=image, outputs={"5": tf_keras.layers.Conv2D(width, 3, name="conv")(image)},
                             **kwargs)
            self.width = width

        def get_config(self) -> dict:
            return {"width": self.width, "name": self.name}

        @classmethod
        def from_config(cls, config: dict, custom_objects=None) -> "ConfigBackbone":
            return cls(**config)

    image = tf_keras.Input((16, 16, 3))
    backbone = ConfigBackbone(name="config_backbone")
    model = tf_keras.Model(image, tf_keras.layers.Dense(2)(tf_keras.layers.GlobalAveragePooling2D()(
        backbone(image)["5"])))
    twin = mixed_precision_twin(model)
    assert twin.get_layer("config_backbone").get_layer("conv").compute_dtype == "float16"
    assert tf_keras.mixed_precision.global_policy().name == "float32"  # the process's policy is left as it was


def test_lambda_head_exports_with_a_dynamic_batch_and_matches_the_notebook(lambda_head, softmax) -> None:
    """An opaque head is differentiated per image inside an ONNX Loop: correct for any batch, saved with its
    weights (a lambda's layers are tracked through the variables the graph reads)."""
    import onnx

    root, manifest = lambda_head
    assert manifest["score"] == "model output" and manifest["head"] == []
    G.assert_parity(root, softmax.reference("output"), softmax)
    model = onnx.load(str(root / C.ONNX_FILE))
    assert "Loop" in {n.op_type for n in model.graph.node}
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")


# --- refusals, each one line naming the fix -----------------------------------------------------------------------
def _refusal(model, options, tmp_path: Path) -> str:
    from gradcam_engine.export import ExportError, export_artifact

    with pytest.raises(ExportError) as caught:
        export_artifact(model, tmp_path / "a", options)
    message = str(caught.value)
    assert "\n" not in message
    assert not (tmp_path / "a").exists()
    return message


def test_an_unknown_score_is_refused_in_one_line(linear, tmp_path) -> None:
    from gradcam_engine.export import ExportOptions

    message = _refusal((linear.backbone, linear.head), ExportOptions(layer="5", score="prob"), tmp_path)
    assert message == "unknown score 'prob'; choose logit, output"


def test_dict_backbone_without_a_level_lists_the_levels(linear, tmp_path) -> None:
    from gradcam_engine.export import ExportOptions

    message = _refusal((linear.backbone, linear.head), ExportOptions(), tmp_path)
    assert "dict of levels ['4', '5']" in message and "--layer" in message
    message = _refusal((linear.backbone, linear.head), ExportOptions(layer="6"), tmp_path)
    assert "'6' is not one" in message


def test_pair_layer_inside_a_single_output_backbone_moves_the_rest_into_the_head() -> None:
    from gradcam_engine.export import ExportOptions
    from gradcam_engine.export.api import model_parts

    L = tf_keras.layers
    image = tf_keras.Input((16, 16, 3))
    x = L.Conv2D(4, 3, name="conv")(image)
    backbone = tf_keras.Model(image, L.BatchNormalization(name="bn")(L.ReLU(name="relu")(x)), name="plain")
    gap, dense = L.GlobalAveragePooling2D(name="gap"), L.Dense(2, name="out")
    dense(gap(backbone.output))  # built
    parts = model_parts((backbone, [gap, dense]), ExportOptions(layer="relu"))
    assert parts.layer_path == "plain/relu" and parts.name == "plain" and parts.input_size == (16, 16)
    assert parts.feature_key is None
    assert [layer.name for layer in parts.head.layers] == ["bn", "gap", "out"]
    assert parts.backbone.output.shape[1:] == (14, 14, 4)


def test_subclassed_tf_keras_model_is_refused_with_the_pair_route(tmp_path) -> None:
    from gradcam_engine.export import ExportOptions

    class Classifier(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = tf_keras.layers.Conv2D(4, 3)
            self.pool = tf_keras.layers.GlobalAveragePooling2D()

        def call(self, x):
            return self.pool(self.conv(x))

    model = Classifier()
    model(np.zeros((1, 16, 16, 3), np.float32))
    message = _refusal(model, ExportOptions(), tmp_path)
    assert "without a functional graph" in message and "(backbone, head) pair" in message


def test_head_list_holding_a_function_is_refused(linear, tmp_path) -> None:
    from gradcam_engine.export import ExportOptions

    message = _refusal((linear.backbone, [linear.gap, lambda x: x]), ExportOptions(layer="5"), tmp_path)
    assert "item 1 (function)" in message and "one callable" in message


def test_unbuilt_dense_head_layer_is_refused(linear, tmp_path) -> None:
    from gradcam_engine.export import ExportOptions

    fresh = tf_keras.layers.Dense(2, name="fresh")
    message = _refusal((linear.backbone, [linear.gap, fresh]), ExportOptions(layer="5"), tmp_path)
    assert "'fresh'" in message and "no weights yet" in message


def test_head_rules_serve_both_frameworks_by_layer_kind() -> None:
    import keras

    from gradcam_engine.export.frameworks import layer_kind
    from gradcam_engine.export.head import supported_layers

    for name, args in [("Dense", (2,)), ("GlobalAveragePooling2D", ()), ("BatchNormalization", ()),
                       ("Dropout", (0.5,)), ("ReLU", ()), ("Softmax", ()), ("Flatten", ())]:
        assert layer_kind(getattr(keras.layers, name)(*args)) == layer_kind(getattr(tf_keras.layers, name)(*args)) \
            == name
        assert name in supported_layers() or name == "Softmax"  # a final Softmax is the score, not a rule

    class MyDense(tf_keras.layers.Dense):
        pass
    assert layer_kind(MyDense(2)) is None  # a subclass may compute anything: no rule applies to it
    for base in (keras.layers.Dense, tf_keras.layers.Dense):  # even one that keeps the built-in's name
        assert layer_kind(type("Dense", (base,), {})(2)) is None


def test_importing_export_does_not_import_tf_keras() -> None:
    """tf_keras is optional: exporting a Keras 3 model never loads it."""
    code = ("import sys, keras\n"
            "from gradcam_engine.export import api, frameworks, graph, head, keras2, keras3, locate, mixed, sources\n"
            "assert frameworks.framework_of(keras.layers.Dense(2)).name == 'keras'\n"
            "assert frameworks.framework_of(lambda x: x) is None\n"
            "assert 'tf_keras' not in sys.modules, 'tf_keras was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_manifest_on_disk_names_the_framework(readme_pair) -> None:
    root, manifest = readme_pair
    assert json.loads((root / C.MANIFEST).read_text())["framework"] == "tf_keras"


def test_model_garden_extra_pins_match_the_tensorflow_pin() -> None:
    """tf-keras and tensorflow-text are released for one TensorFlow minor each, and Model Garden's nightly is built
    against one: all must name the minor the `export` extra pins, or the install route of the README breaks."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = (REPO / "pyproject.toml").read_text()
    extras = tomllib.loads(pyproject)["project"]["optional-dependencies"]
    pins = {r.name: r.specifier for r in map(Requirement, extras["export"] + extras["tf-keras"]
                                             + extras["model-garden"])}
    tensorflow = pins["tensorflow"]
    major, minor = Version(next(s.version for s in tensorflow if s.operator == ">=")).release[:2]
    assert f"{major}.{minor}.0" in tensorflow and f"{major}.{minor}.99" in tensorflow
    assert f"{major}.{minor - 1}.99" not in tensorflow and f"{major}.{minor + 1}.0" not in tensorflow  # one minor
    for twin in ("tf-keras", "tensorflow-text"):
        assert pins[twin] == tensorflow, f"{twin} {pins[twin]} does not match tensorflow {tensorflow}"
    readme = (REPO / "README.md").read_text()
    nightlies = re.findall(r"tf-models-nightly==([0-9][\w.]*)", pyproject + readme)
    assert nightlies and all(Version(v).release[:2] == (major, minor) for v in nightlies), nightlies
