"""Every CAM method of the fused graph against its formula, computed in numpy from the per-image GradientTape feature
maps and gradients of the reference (bench/contenders/reference.py): ONNX Runtime and the SavedModel, batches of 5
and of 1, mixed targets (explicit non-top-1 classes), on a head whose gradients vary over the grid (Flatten -> Dense
(relu) -> Dense) and on a GAP head; max abs diff <= 1e-4, Eigen-CAM <= 1e-3. Also the graph's contract for methods
(`cam` = the first, `cams` [N, M, h, w], the manifest's `methods`), the default export unchanged, fp16, and the
registry's refusals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.engine import contract as C
from gradcam_engine.export.methods import eigen_plan, method_names
from gradcam_engine.export.parity import EIGEN_MIN_GAP, eigen_gap

BATCH = 5
EXPLICIT = (1, 3)                  # slots that ask for a class other than the model's top-1
TOLERANCE = {"eigencam": 1e-3}     # power iteration vs SVD; every other method 1e-4
DEFAULT_TOLERANCE = 1e-4
# Any order may be asked for: one case lists the methods as the registry does, the other in reverse.
SHUFFLED = tuple(reversed(method_names()))


@dataclass
class MethodsCase:
    """A small model exported with every method, and what the formulas say its maps must be."""

    name: str
    root: Path
    manifest: dict[str, Any]
    methods: tuple[str, ...]
    images: np.ndarray
    class_index: np.ndarray
    reference: dict[str, np.ndarray]   # the per-image GradientTape reference (feature maps, gradients, cam, ...)
    expected: np.ndarray               # [N, M, h, w] from the numpy formulas
    keras_model: Any = None

    def onnx(self, images: np.ndarray, class_index: np.ndarray, file: str = C.ONNX_FILE) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(self.root / file), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {C.IMAGES: images, C.CLASS_INDEX: class_index})))

    def saved_model(self, images: np.ndarray, class_index: np.ndarray,
                    folder: str = C.SAVED_MODEL_DIR) -> dict[str, np.ndarray]:
        import tensorflow as tf

        signature = tf.saved_model.load(str(self.root / folder)).signatures[C.SIGNATURE]
        out = signature(**{C.IMAGES: tf.constant(images), C.CLASS_INDEX: tf.constant(class_index)})
        return {k: v.numpy() for k, v in out.items()}


def _case(name: str, model: Any, target: str, head: Any, size: tuple[int, int], methods: tuple[str, ...],
          root: Path, seed: int, precision: str = "fp32", keep_failing: bool = False) -> MethodsCase:
    import keras

    from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference, reference_maps
    from gradcam_engine.export import ExportOptions, export_artifact

    manifest = export_artifact(model, root, ExportOptions(layer=target, preprocessing="tf", methods=methods,
                                                          precision=precision, keep_failing=keep_failing))
    backbone = keras.Model(model.input, model.get_layer(target).output)
    parts = ReferenceParts(preprocess=keras.applications.mobilenet_v2.preprocess_input,
                           backbone=lambda x: backbone(x, training=False), head=head,
                           predict=lambda x: model(x, training=False))
    images = scene_images(BATCH, size, seed)
    top1 = gradcam_reference(images, np.full(BATCH, -1, np.int32), parts)["target_class"]
    class_index = np.full(BATCH, -1, np.int32)
    num_classes = int(model.output.shape[-1])
    for slot in EXPLICIT:
        class_index[slot] = (top1[slot] + 1) % num_classes
    reference = gradcam_reference(images, class_index, parts)
    expected = reference_maps(reference[C.FEATURE_MAPS], reference[C.GRADIENTS], methods)
    return MethodsCase(name, root, manifest, methods, images, class_index, reference, expected, model)


def _flatten_model() -> tuple[Any, Any]:
    """8x8x12 target grid, head Flatten -> Dense(16, relu) -> Dense(4, softmax): gradients vary over the grid."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(121)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="target")(x)
    flatten, hidden = keras.layers.Flatten(name="flatten"), keras.layers.Dense(16, activation="relu", name="hidden")
    classes = keras.layers.Dense(4, activation="softmax", name="classes")
    model = keras.Model(inputs, classes(hidden(flatten(x))), name="flatten_head")
    return model, lambda fm: tf.matmul(hidden(flatten(fm)), classes.kernel) + classes.bias  # the pre-softmax logit


def _gap_model() -> tuple[Any, Any]:
    """20x20x10 target grid (larger than Eigen-CAM's squaring limit), head GAP -> Dense(3) logits."""
    import keras

    keras.utils.set_random_seed(122)
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(10, 3, padding="same", activation="relu", name="target")(x)
    gap, dense = keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, dense(gap(x)), name="gap_head")
    return model, lambda fm: dense(gap(fm))


@pytest.fixture(scope="module")
def flatten_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    model, head = _flatten_model()
    return _case("flatten", model, "target", head, (32, 32), method_names(),
                 tmp_path_factory.mktemp("methods") / "flatten", seed=31)


@pytest.fixture(scope="module")
def gap_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    model, head = _gap_model()
    return _case("gap", model, "target", head, (40, 40), SHUFFLED, tmp_path_factory.mktemp("methods") / "gap",
                 seed=32)


@pytest.fixture(params=["flatten_case", "gap_case"], ids=["flatten_dense_head", "gap_head"])
def case(request: pytest.FixtureRequest) -> MethodsCase:
    return request.getfixturevalue(request.param)


def assert_maps_match_formulas(cams: np.ndarray, expected: np.ndarray, methods: tuple[str, ...], what: str) -> None:
    assert cams.shape == expected.shape and cams.dtype == np.float32
    for i, method in enumerate(methods):
        diff = float(np.abs(cams[:, i].astype(np.float64) - expected[:, i]).max())
        assert diff <= TOLERANCE.get(method, DEFAULT_TOLERANCE), f"{what}: {method} max abs diff {diff:.2e}"


# --- the test data is worth checking first: parity on flat or ill-defined maps would prove little --------------
def test_every_reference_map_is_non_zero_with_spatial_variation(case: MethodsCase) -> None:
    for i, method in enumerate(case.methods):
        maps = case.expected[:, i]
        lively = [bool(m.max() == 1.0 and m.std() > 1e-2 and m.min() < 0.9) for m in maps]
        assert sum(lively) >= BATCH - 1, f"{case.name} {method}: flat reference maps {lively}"
        assert any(lively[slot] for slot in EXPLICIT), f"{case.name} {method}: explicit classes give flat maps"


def test_explicit_targets_are_not_the_top1_class(case: MethodsCase) -> None:
    top1 = case.reference[C.PREDICTIONS].argmax(-1)
    explicit = case.class_index >= 0
    assert explicit.any() and (~explicit).any()
    assert (case.reference[C.TARGET_CLASS][explicit] != top1[explicit]).all()


def test_the_methods_give_different_maps_where_their_formulas_differ(case: MethodsCase) -> None:
    by = dict(zip(case.methods, np.moveaxis(case.expected, 1, 0)))
    # With GAP the gradient is constant over the grid, so HiResCAM and XGrad-CAM reduce to Grad-CAM (their papers
    # say so); the Flatten head's gradients vary over the grid and tell every method apart.
    same_as_gradcam = {"hirescam", "xgradcam"} if case.name == "gap" else set()
    for a in case.methods:
        for b in case.methods[case.methods.index(a) + 1:]:
            alike = {a, b} <= same_as_gradcam | {"gradcam"}
            differ = np.abs(by[a] - by[b]).max() > 0.05
            assert differ != alike, f"{case.name}: {a} vs {b} {'differ' if differ else 'agree'}"


def test_eigencam_direction_is_well_defined_on_the_test_images(case: MethodsCase) -> None:
    gaps = eigen_gap(case.reference[C.FEATURE_MAPS])
    assert gaps.min() >= EIGEN_MIN_GAP, f"{case.name}: near-equal top eigenvalues {gaps}"


# --- parity ---------------------------------------------------------------------------------------------------
def test_onnx_maps_match_the_formulas_for_a_mixed_batch(case: MethodsCase) -> None:
    got = case.onnx(case.images, case.class_index)
    np.testing.assert_array_equal(got[C.TARGET_CLASS], case.reference[C.TARGET_CLASS])
    assert_maps_match_formulas(got[C.CAMS], case.expected, case.methods, f"{case.name} onnx")


def test_saved_model_maps_match_the_formulas_for_a_mixed_batch(case: MethodsCase) -> None:
    got = case.saved_model(case.images, case.class_index)
    np.testing.assert_array_equal(got[C.TARGET_CLASS], case.reference[C.TARGET_CLASS])
    assert_maps_match_formulas(got[C.CAMS], case.expected, case.methods, f"{case.name} saved model")


@pytest.mark.parametrize("runtime", ["onnx", "saved_model"])
def test_maps_match_the_formulas_for_a_batch_of_one(case: MethodsCase, runtime: str) -> None:
    run = case.onnx if runtime == "onnx" else case.saved_model
    for i in range(BATCH):
        got = run(case.images[i:i + 1], case.class_index[i:i + 1])
        assert_maps_match_formulas(got[C.CAMS], case.expected[i:i + 1], case.methods, f"{case.name} image {i}")


def test_cam_is_the_first_method_listed(case: MethodsCase) -> None:
    got = case.onnx(case.images, case.class_index)
    np.testing.assert_array_equal(got[C.CAM], got[C.CAMS][:, 0])
    first = case.methods[0]
    assert float(np.abs(got[C.CAM] - case.expected[:, 0]).max()) <= TOLERANCE.get(first, DEFAULT_TOLERANCE)


def test_gradcam_among_other_methods_is_still_the_reference_cam(case: MethodsCase) -> None:
    got = case.onnx(case.images, case.class_index)
    gradcam = got[C.CAMS][:, case.methods.index("gradcam")]
    assert float(np.abs(gradcam - case.reference[C.CAM]).max()) <= DEFAULT_TOLERANCE


# --- the contract ---------------------------------------------------------------------------------------------
def test_manifest_lists_the_methods_in_output_order_and_the_cams_shape(case: MethodsCase) -> None:
    manifest = json.loads((case.root / C.MANIFEST).read_text())
    assert manifest["methods"] == list(case.methods)
    _, h, w, _ = case.reference[C.FEATURE_MAPS].shape
    outputs = {o["name"]: o for o in manifest["outputs"]}
    assert outputs[C.CAMS] == {"name": C.CAMS, "dtype": "float32", "shape": ["N", len(case.methods), h, w]}
    assert manifest["cam"]["method"].startswith(f"{case.methods[0]}: ")
    assert manifest["verification"][C.ONNX_FILE]["cams_max_abs_diff"] <= 1e-4


def test_onnx_cams_output_has_a_dynamic_batch(case: MethodsCase) -> None:
    import onnx

    graph = onnx.load(str(case.root / C.ONNX_FILE)).graph
    (cams,) = [o for o in graph.output if o.name == C.CAMS]
    dims = cams.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:2]] == [len(case.methods)]
    assert cams.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def default_export(flatten_case: MethodsCase, tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    from gradcam_engine.export import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("methods") / "default"
    manifest = export_artifact(flatten_case.keras_model, root, ExportOptions(layer="target", preprocessing="tf"))
    return MethodsCase("default", root, manifest, ("gradcam",), flatten_case.images, flatten_case.class_index,
                       flatten_case.reference, flatten_case.expected[:, :1])


def test_default_export_is_gradcam_alone_with_a_one_method_cams(default_export: MethodsCase) -> None:
    assert default_export.manifest["methods"] == ["gradcam"]
    got = default_export.onnx(default_export.images, default_export.class_index)
    assert got[C.CAMS].shape == (BATCH, 1, *got[C.CAM].shape[1:])
    np.testing.assert_array_equal(got[C.CAMS][:, 0], got[C.CAM])
    assert float(np.abs(got[C.CAM] - default_export.reference[C.CAM]).max()) <= DEFAULT_TOLERANCE


def test_default_cam_is_bit_for_bit_the_gradcam_of_a_many_method_graph(default_export: MethodsCase,
                                                                      flatten_case: MethodsCase) -> None:
    """The same ops compute Grad-CAM whatever else the graph holds: adding methods moves no default figure."""
    alone = default_export.onnx(default_export.images, default_export.class_index)[C.CAM]
    many = flatten_case.onnx(flatten_case.images, flatten_case.class_index)[C.CAMS]
    np.testing.assert_array_equal(alone, many[:, flatten_case.methods.index("gradcam")])


# --- fp16 -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    model, head = _flatten_model()
    # The precision gate judges on uniform noise (no --calibrate here) and refuses this random-weight model's
    # all-fp16 SavedModel there (one noise image's CAM correlates at 0.85); these tests judge every method on scenes,
    # so both files are kept. The gate's refusals have tests of their own (test_precision_gate.py).
    return _case("fp16", model, "target", head, (32, 32), method_names(), tmp_path_factory.mktemp("methods") / "h",
                 seed=31, precision="both", keep_failing=True)


def test_fp16_onnx_computes_every_method_in_float32(fp16_case: MethodsCase) -> None:
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_case.root / C.ONNX_FP16_FILE)))
    half = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    cam_nodes = [n for n in model.graph.node if n.name.startswith("cam/")]
    scopes = {n.name.split("/")[1] for n in cam_nodes}
    assert scopes >= set(method_names())  # every method's nodes are there, under cam/<method>/
    assert not [n.name for n in cam_nodes if half.intersection([*n.input, *n.output])]


@pytest.mark.parametrize("file", [C.ONNX_FP16_FILE, C.SAVED_MODEL_FP16_DIR])
def test_fp16_maps_stay_close_to_fp32(fp16_case: MethodsCase, file: str) -> None:
    from gradcam_engine.export.parity import cam_correlation

    case = fp16_case
    full = case.onnx(case.images, case.class_index)
    explicit = full[C.TARGET_CLASS]  # the same class on both sides, so a near-tie cannot compare two classes
    half = case.onnx(case.images, explicit, file) if file.endswith(".onnx") else \
        case.saved_model(case.images, explicit, file)
    assert half[C.CAMS].shape == full[C.CAMS].shape and half[C.CAMS].dtype == np.float32
    for i, method in enumerate(case.methods):
        assert cam_correlation(full[C.CAMS][:, i], half[C.CAMS][:, i]) >= 0.99, method
        assert float(np.abs(full[C.CAMS][:, i] - half[C.CAMS][:, i]).max()) <= 0.05, method
    assert case.manifest["verification"][C.ONNX_FP16_FILE]["cams_max_abs_diff"] <= 0.05


def test_the_precision_gate_judges_every_methods_map(fp16_case: MethodsCase) -> None:
    """Each method's figures in the manifest are its own maps' correlations on the gate's images (Eigen-CAM's only
    where its direction is defined), recomputed here from the written files."""
    from gradcam_engine.export.calibration import load_gate_images
    from gradcam_engine.export.parity import cam_correlations

    images = load_gate_images(None, 0, (32, 32)).held_out  # no --calibrate: the gate's seeded random images
    full = fp16_case.onnx(images, np.full(len(images), -1, np.int32))
    half = fp16_case.onnx(images, full[C.TARGET_CLASS], C.ONNX_FP16_FILE)
    defined = eigen_gap(full[C.FEATURE_MAPS]) >= EIGEN_MIN_GAP
    assert 0 < defined.sum()
    figures = fp16_case.manifest["precision_gate"]["results"][C.ONNX_FP16_FILE]["figures"]
    assert list(figures["methods"]) == list(fp16_case.methods)
    for i, method in enumerate(fp16_case.methods):
        judged = defined if method == "eigencam" else np.ones(len(images), bool)
        corr = cam_correlations(full[C.CAMS][judged, i], half[C.CAMS][judged, i])
        own = figures["methods"][method]
        assert own["images"] == judged.sum() and own["skipped"] == len(images) - judged.sum(), method
        assert own["cam_corr_mean"] == pytest.approx(corr.mean(), abs=1e-6), method
        assert own["cam_corr_worst"] == pytest.approx(corr.min(), abs=1e-6), method
    assert figures["methods"][fp16_case.methods[0]]["cam_corr_mean"] == pytest.approx(figures["cam_corr_mean"])


# --- the registry -----------------------------------------------------------------------------------------------
def test_every_registered_method_has_a_numpy_formula_and_a_paper() -> None:
    from gradcam_engine.bench.contenders.reference import METHOD_FORMULAS
    from gradcam_engine.export.methods import summary

    assert method_names()[0] == C.DEFAULT_METHOD
    assert set(method_names()) == set(METHOD_FORMULAS)
    for name in method_names():
        assert any(year in summary(name) for year in ("2017", "2018", "2020", "2021")), summary(name)


@pytest.mark.parametrize(("methods", "message"), [
    (("gradcam", "scorecam"), "unknown CAM method 'scorecam'; known methods: gradcam, gradcampp, xgradcam, "
                              "hirescam, layercam, eigencam"),
    (("layercam", "gradcam", "layercam"), "CAM method 'layercam' given more than once"),
    ((), "no CAM method given"),
])
def test_export_refuses_unknown_repeated_or_no_methods(methods: tuple[str, ...], message: str,
                                                       tmp_path: Path) -> None:
    from gradcam_engine.export import ExportError, ExportOptions, export_artifact

    with pytest.raises(ExportError) as error:
        export_artifact(tmp_path / "missing.keras", tmp_path / "out", ExportOptions(methods=methods))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_an_unknown_method_in_one_line_listing_the_known_ones(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gradcam_engine.cli.main import main

    assert main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "a"), "--methods",
                 "gradcam,gradcam++"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gradcam export: error: unknown CAM method 'gradcam++'; known methods: "
                   + ", ".join(method_names()))


def test_eigencam_of_a_constant_feature_map_is_all_zero() -> None:
    import tensorflow as tf

    from gradcam_engine.export.methods import cam_maps

    A = tf.concat([tf.fill([1, 6, 6, 4], 3.0), tf.random.stateless_uniform([1, 6, 6, 4], (1, 2))], axis=0)
    G = tf.random.stateless_normal([2, 6, 6, 4], (3, 4))
    (eigen,) = cam_maps(A, G, ["eigencam"])
    assert not np.any(eigen.numpy()[0]) and np.isfinite(eigen.numpy()).all()
    assert eigen.numpy()[1].max() == 1.0  # the varied map next to it is unaffected


def test_command_line_exports_the_methods_in_the_order_given(flatten_case: MethodsCase, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    flatten_case.keras_model.save(tmp_path / "m.keras")
    assert main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "a"), "--layer", "target",
                 "--preprocess", "tf", "--methods", "eigencam, gradcam"]) == 0
    assert json.loads((tmp_path / "a" / C.MANIFEST).read_text())["methods"] == ["eigencam", "gradcam"]
    assert "CAM methods: eigencam, gradcam" in capsys.readouterr().out
    got = flatten_case.onnx(flatten_case.images, flatten_case.class_index)
    again = MethodsCase("cli", tmp_path / "a", {}, ("eigencam", "gradcam"), flatten_case.images,
                        flatten_case.class_index, flatten_case.reference, flatten_case.expected)
    np.testing.assert_array_equal(again.onnx(flatten_case.images, flatten_case.class_index)[C.CAM],
                                  got[C.CAMS][:, flatten_case.methods.index("eigencam")])


# --- the export-time check --------------------------------------------------------------------------------------
def test_parity_check_flags_any_methods_map_but_eigencam_only_where_its_direction_is_defined() -> None:
    from gradcam_engine.export.parity import compare, failures

    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(2, 16))
    pattern -= pattern.mean(axis=1, keepdims=True)
    pattern /= np.linalg.norm(pattern, axis=1, keepdims=True)
    pattern[1] -= pattern[0] * (pattern[0] @ pattern[1])
    pattern[1] /= np.linalg.norm(pattern[1])
    tied = np.einsum("kp,kc->pc", pattern, np.eye(2, 3) * 5.0)             # two directions of equal energy
    clear = np.einsum("kp,kc->pc", pattern, np.diag([5.0, 1.0]) @ np.eye(2, 3))
    fm = np.stack([tied, clear]).reshape(2, 4, 4, 3).astype(np.float32)
    assert eigen_gap(fm)[0] < 1e-6 < EIGEN_MIN_GAP < eigen_gap(fm)[1]
    cams = rng.uniform(0, 1, (2, 2, 4, 4)).astype(np.float32)
    base = {C.PREDICTIONS: np.eye(2), C.TARGET_CLASS: np.arange(2), C.CAM: cams[:, 0], C.CAMS: cams,
            C.FEATURE_MAPS: fm}
    methods = ("gradcam", "eigencam")
    assert compare(base, dict(base), methods)["cams_max_abs_diff"] == 0.0
    eigen_tied = cams.copy()
    eigen_tied[0, 1] = 1 - eigen_tied[0, 1]                                   # a different direction, tied image
    assert compare(base, {**base, C.CAMS: eigen_tied}, methods)["cams_max_abs_diff"] == 0.0
    eigen_clear = cams.copy()
    eigen_clear[1, 1] += 0.01                                                 # wrong on the well-defined image
    figures = compare(base, {**base, C.CAMS: eigen_clear}, methods)
    assert figures["cams_max_abs_diff"] == pytest.approx(0.01, abs=1e-6) and "cams_max_abs_diff" in failures(
        figures, "fp32")
    gradient = cams.copy()
    gradient[0, 0] += 0.001                                                    # any other method: every image
    assert "cams_max_abs_diff" in failures(compare(base, {**base, C.CAMS: gradient}, methods), "fp32")


@pytest.mark.parametrize(("h", "w", "c", "plan"), [
    (7, 7, 64, ("cells", 8, 0)),       # fewer cells than channels, as in ResNet50 (7 x 7 x 2048)
    (12, 12, 16, ("channels", 8, 0)),  # fewer channels than cells: the C x C matrix
    (17, 17, 300, ("cells", 0, 64)),   # both sides large: power steps instead of squarings
])
def test_eigencam_matches_svd_on_every_path_in_tensorflow_and_onnx(h: int, w: int, c: int,
                                                                   plan: tuple[str, int, int]) -> None:
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from gradcam_engine.bench.contenders.reference import reference_maps
    from gradcam_engine.export.methods import cam_maps

    assert eigen_plan(h * w, c) == plan
    rng = np.random.default_rng(h * c)
    modes = rng.normal(size=(3, 3, h * w, 1)) * rng.normal(size=(3, 3, 1, c))  # a few strong directions, then noise
    A = np.maximum((modes * np.array([4.0, 2.0, 1.0])[None, :, None, None]).sum(1)
                   + rng.normal(size=(3, h * w, c)), 0).reshape(3, h, w, c).astype(np.float32)
    assert eigen_gap(A).min() >= EIGEN_MIN_GAP
    expected = reference_maps(A, np.zeros_like(A), ["eigencam"])[:, 0]

    fn = tf.function(lambda a: {"eigen": cam_maps(a, tf.zeros_like(a), ["eigencam"])[0]},
                     input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="a")])
    np.testing.assert_allclose(fn(tf.constant(A))["eigen"].numpy(), expected, atol=1e-3)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):  # a dynamic batch
        (got,) = session.run(None, {"a": A[:n]})
        np.testing.assert_allclose(got, expected[:n], atol=1e-3)
    assert (expected.max(axis=(1, 2)) == 1.0).all() and expected.std(axis=(1, 2)).min() > 0.05
