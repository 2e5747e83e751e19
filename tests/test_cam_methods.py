"""Every CAM method of the fused graph against its formula, computed in numpy from the per-image GradientTape feature
maps and gradients of the reference (bench/contenders/reference.py): ONNX Runtime and the SavedModel, batches of 5
and of 1, mixed targets (explicit non-top-1 classes), on a head whose gradients vary over the grid (Flatten -> Dense
(relu) -> Dense) and on two GAP heads, one with more channels than grid cells; max abs diff <= 1e-4, Eigen-CAM
<= 1e-3. Also the graph's contract for methods (`cam` = the first, `cams` [N, M, h, w], the manifest's `methods`),
the default export unchanged, fp16, and the registry's refusals.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.bench.tools.methods_parity import SMALL_MODELS, MethodsCase, build_case, method_diffs
from gradcam_engine.engine import contract as C
from gradcam_engine.export.methods import eigen_plan, method_names
from gradcam_engine.export.parity import EIGEN_MIN_GAP, eigen_gap
from engine_support import lively

BATCH = 5
EXPLICIT = (1, 3)                  # slots that ask for a class other than the model's top-1
TOLERANCE = {"eigencam": 1e-3}     # power iteration vs SVD; every other method 1e-4
DEFAULT_TOLERANCE = 1e-4
# Any order may be asked for: one case lists the methods as the registry does, the other in reverse.
SHUFFLED = tuple(reversed(method_names()))


@pytest.fixture(scope="module")
def flatten_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    return build_case("flatten", tmp_path_factory.mktemp("methods") / "flatten", method_names(), BATCH, EXPLICIT)


@pytest.fixture(scope="module")
def gap_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    return build_case("gap", tmp_path_factory.mktemp("methods") / "gap", SHUFFLED, BATCH, EXPLICIT)


@pytest.fixture(scope="module")
def cells_case(tmp_path_factory: pytest.TempPathFactory) -> MethodsCase:
    """More channels than grid cells, as ResNet50's 7x7x2048: Eigen-CAM's Gram matrix on the cells side."""
    return build_case("cells", tmp_path_factory.mktemp("methods") / "cells", method_names(), BATCH, EXPLICIT)


@pytest.fixture(params=["flatten_case", "gap_case", "cells_case"],
                ids=["flatten_dense_head", "gap_head", "more_channels_than_cells"])
def case(request: pytest.FixtureRequest) -> MethodsCase:
    return request.getfixturevalue(request.param)


def assert_maps_match_formulas(cams: np.ndarray, expected: np.ndarray, methods: tuple[str, ...], what: str) -> None:
    assert cams.shape == expected.shape and cams.dtype == np.float32
    for method, diff in zip(methods, method_diffs(cams, expected)):
        assert diff <= TOLERANCE.get(method, DEFAULT_TOLERANCE), f"{what}: {method} max abs diff {diff:.2e}"


# --- the test data is worth checking first: parity on flat or ill-defined maps would prove little --------------
def test_every_reference_map_is_non_zero_with_spatial_variation(case: MethodsCase) -> None:
    for i, method in enumerate(case.methods):
        alive = lively(case.expected[:, i])
        assert alive.sum() >= BATCH - 1, f"{case.name} {method}: flat reference maps {alive}"
        assert alive[list(EXPLICIT)].any(), f"{case.name} {method}: explicit classes give flat maps"


def test_explicit_targets_are_not_the_top1_class(case: MethodsCase) -> None:
    top1 = case.reference[C.PREDICTIONS].argmax(-1)
    explicit = case.class_index >= 0
    assert explicit.any() and (~explicit).any()
    assert (case.reference[C.TARGET_CLASS][explicit] != top1[explicit]).all()


@pytest.mark.parametrize("name", ["flatten_case", "gap_case"])
def test_the_methods_give_different_maps_where_their_formulas_differ(name: str,
                                                                     request: pytest.FixtureRequest) -> None:
    case = request.getfixturevalue(name)
    by = dict(zip(case.methods, np.moveaxis(case.expected, 1, 0)))
    # With GAP the gradient is constant over the grid, so HiResCAM and XGrad-CAM reduce to Grad-CAM (their papers
    # say so); the Flatten head's gradients vary over the grid and tell every method apart.
    same_as_gradcam = {"hirescam", "xgradcam"} if SMALL_MODELS[case.name].gap_head else set()
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
    # The precision gate judges on uniform noise (no --calibrate here) and refuses this random-weight model's
    # all-fp16 SavedModel there (one noise image's CAM correlates at 0.85); these tests judge every method on scenes,
    # so both files are kept. The gate's refusals have tests of their own (test_precision_gate.py).
    return build_case("flatten", tmp_path_factory.mktemp("methods") / "h", method_names(), BATCH, EXPLICIT,
                      precision="both", keep_failing=True)


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
        assert re.search(r"\b(19|20)\d\d\b", summary(name)), summary(name)  # the paper's year


@pytest.mark.parametrize(("methods", "message"), [
    (("gradcam", "scorecam"), "unknown CAM method 'scorecam'; known methods: " + ", ".join(method_names())),
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


def _activations(h: int, w: int, c: int, gap: float | None, seed: int) -> np.ndarray:
    """Three images' feature maps [3, h, w, C]: with gap None, a few strong directions plus noise (wide gaps); else
    built from their spectrum, the top two eigenvalues of the centred Gram matrix (1 - gap) apart."""
    rng = np.random.default_rng(seed)
    if gap is None:
        modes = rng.normal(size=(3, 3, h * w, 1)) * rng.normal(size=(3, 3, 1, c))
        return np.maximum((modes * np.array([4.0, 2.0, 1.0])[None, :, None, None]).sum(1)
                          + rng.normal(size=(3, h * w, c)), 0).reshape(3, h, w, c).astype(np.float32)
    k = min(h * w - 1, c)
    eigenvalues = np.concatenate([[1.0, 1.0 - gap], 0.8 * (1.0 - gap) * np.exp(-np.arange(k - 2) / 20)])
    maps = []
    for _ in range(3):
        u = rng.normal(size=(h * w, k))
        u = np.linalg.qr(u - u.mean(axis=0))[0]                     # orthonormal, each column centred over the grid
        v = np.linalg.qr(rng.normal(size=(c, k)))[0]
        maps.append((u * np.sqrt(eigenvalues)) @ v.T + rng.uniform(1, 2, c))  # + a constant per channel
    return np.stack(maps).reshape(3, h, w, c).astype(np.float32)


@pytest.mark.parametrize(("h", "w", "c", "side", "squares", "gap"), [
    (7, 7, 64, "cells", True, None),       # fewer cells than channels, as in ResNet50 (7 x 7 x 2048)
    (12, 12, 16, "channels", True, None),  # fewer channels than cells: the C x C matrix
    (17, 17, 300, "cells", False, None),   # both sides large: power steps instead of squarings
    (7, 7, 64, "cells", True, 0.06),       # the top two eigenvalues 6% apart: converged on every path
    (17, 17, 300, "cells", False, 0.06),
])
def test_eigencam_matches_svd_on_every_path_in_tensorflow_and_onnx(h: int, w: int, c: int, side: str, squares: bool,
                                                                   gap: float | None) -> None:
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from gradcam_engine.bench.contenders.reference import reference_maps
    from gradcam_engine.export.methods import cam_maps

    plan = eigen_plan(h * w, c)
    assert plan[0] == side and (plan[1] > 0) == squares
    A = _activations(h, w, c, gap, seed=h * c)
    gaps = eigen_gap(A)
    assert gaps.min() >= EIGEN_MIN_GAP and (gap is None or gaps.max() < 0.1), gaps
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


def test_the_exported_cases_take_both_sides_of_eigencams_gram_matrix(flatten_case: MethodsCase,
                                                                     gap_case: MethodsCase,
                                                                     cells_case: MethodsCase) -> None:
    sides = {}
    for case in (flatten_case, gap_case, cells_case):
        _, h, w, c = case.reference[C.FEATURE_MAPS].shape
        sides[case.name] = eigen_plan(h * w, c)[0]
    assert sides == {"flatten": "channels", "gap": "channels", "cells": "cells"}


def test_the_parity_tool_reports_each_methods_figure_per_runtime_and_batch_size(cells_case: MethodsCase) -> None:
    from gradcam_engine.bench.tools.methods_parity import parity_figures, table

    figures = parity_figures(cells_case, [2, BATCH])
    assert set(figures) == {"onnx", "saved_model"} and set(figures["onnx"]) == {"2", str(BATCH)}
    whole = cells_case.onnx(cells_case.images, cells_case.class_index)[C.CAMS]
    assert list(figures["onnx"][str(BATCH)]) == list(cells_case.methods)
    assert list(figures["onnx"][str(BATCH)].values()) == pytest.approx(method_diffs(whole, cells_case.expected))
    worst = table({"models": {"cells": {"figures": figures}}}, cells_case.methods).splitlines()[-1].split()
    assert worst == ["worst", *(f"{max(b[m] for r in figures.values() for b in r.values()):.1e}"
                                for m in cells_case.methods)]
