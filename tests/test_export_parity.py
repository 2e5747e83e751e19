"""Exported graphs (ONNX Runtime and the TensorFlow SavedModel) against the per-image Grad-CAM reference.

Every model in conftest is exported once; each test here reads that artifact. Tolerances are the contract's:
cam max abs diff <= 1e-4, predictions max diff <= 1e-4 of their scale, identical target classes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CASE_FIXTURES, EXPLICIT_SLOTS, REFERENCE_BATCH, ExportedCase, scene_images
from engine_support import lively
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import ArtifactError, load_artifact, sha256_file

CAM_TOL = 1e-4
PRED_TOL = 1e-4
SCORE_TOL = 1e-4
BATCH_SIZES = (1, 3, 8)


@pytest.fixture(params=CASE_FIXTURES, ids=lambda name: name.removesuffix("_case"))
def case(request: pytest.FixtureRequest) -> ExportedCase:
    return request.getfixturevalue(request.param)


def rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def fm_shape(case: ExportedCase) -> tuple[int, int, int]:
    _, h, w, c = case.reference[C.FEATURE_MAPS].shape
    return h, w, c


def assert_matches_reference(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], case: ExportedCase) -> None:
    n = len(ref[C.TARGET_CLASS])
    h, w, c = fm_shape(case)
    assert set(got) == set(C.OUTPUT_NAMES)
    assert got[C.PREDICTIONS].shape == (n, case.num_classes)
    assert got[C.TARGET_CLASS].shape == (n,) and got[C.TARGET_CLASS].dtype == np.int32
    assert got[C.TARGET_SCORE].shape == (n,)
    assert got[C.FEATURE_MAPS].shape == (n, h, w, c)
    assert got[C.GRADIENTS].shape == (n, h, w, c)
    assert got[C.CAM].shape == (n, h, w)

    np.testing.assert_array_equal(got[C.TARGET_CLASS], ref[C.TARGET_CLASS])
    assert rel_diff(got[C.PREDICTIONS], ref[C.PREDICTIONS]) <= PRED_TOL
    assert float(np.abs(got[C.CAM].astype(np.float64) - ref[C.CAM]).max()) <= CAM_TOL
    score_scale = max(1.0, float(np.abs(ref[C.TARGET_SCORE]).max()))
    assert float(np.abs(got[C.TARGET_SCORE].astype(np.float64) - ref[C.TARGET_SCORE]).max()) <= SCORE_TOL * score_scale
    assert rel_diff(got[C.FEATURE_MAPS], ref[C.FEATURE_MAPS]) <= 1e-4
    assert rel_diff(got[C.GRADIENTS], ref[C.GRADIENTS]) <= 1e-3
    assert float(got[C.CAM].min()) >= 0.0 and float(got[C.CAM].max()) <= 1.0 + 1e-6


def prefix(case: ExportedCase, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    return case.images[:n], case.class_index[:n], {k: v[:n] for k, v in case.reference.items()}


# --- the test data itself is worth checking: parity on all-zero CAMs would prove little ---------------------------
def test_reference_cams_are_real_heatmaps(case: ExportedCase) -> None:
    alive = lively(case.reference[C.CAM])
    assert alive.sum() >= REFERENCE_BATCH - 1, f"{case.name}: degenerate reference CAMs {alive.tolist()}"
    assert alive[list(EXPLICIT_SLOTS)].any(), f"{case.name}: every explicit class_index gave a flat CAM"


def test_reference_predictions_are_not_near_ties(case: ExportedCase) -> None:
    """A near-tie could flip the top-1 class on rounding alone, so identical target classes would prove nothing."""
    predictions = np.sort(case.reference[C.PREDICTIONS], axis=-1)
    margins = predictions[:, -1] - predictions[:, -2]
    assert margins.min() >= 1e-3 * max(1.0, float(np.abs(predictions).max())), f"{case.name}: {margins}"


def test_explicit_class_index_differs_from_the_top1_class(case: ExportedCase) -> None:
    top1 = case.reference[C.PREDICTIONS].argmax(-1)
    explicit = case.class_index >= 0
    assert explicit.any() and (case.class_index == -1).any()
    assert (case.reference[C.TARGET_CLASS][explicit] != top1[explicit]).all()
    np.testing.assert_array_equal(case.reference[C.TARGET_CLASS][~explicit], top1[~explicit])


def test_max_pooling_fixture_has_tied_maxima(max_pool_head_case: ExportedCase) -> None:
    """Its target layer saturates, so GlobalMaxPooling2D meets ties whose gradient TensorFlow shares equally: a rule
    that gave each tie the whole gradient, or only the first one, would not match the reference."""
    fm = max_pool_head_case.reference[C.FEATURE_MAPS]
    peak = fm.max(axis=(1, 2), keepdims=True)
    tied = ((fm == peak).sum(axis=(1, 2)) > 1) & (peak[:, 0, 0, :] > 0)
    assert tied.mean() > 0.25, f"{tied.mean():.0%} of the channels have a tied maximum"


# --- parity -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", BATCH_SIZES, ids=lambda n: f"batch_of_{n}")
def test_onnx_runtime_matches_reference(case: ExportedCase, n: int) -> None:
    images, class_index, ref = prefix(case, n)
    assert_matches_reference(case.run_onnx(images, class_index), ref, case)


@pytest.mark.parametrize("n", BATCH_SIZES, ids=lambda n: f"batch_of_{n}")
def test_saved_model_signature_matches_reference(case: ExportedCase, n: int) -> None:
    images, class_index, ref = prefix(case, n)
    assert_matches_reference(case.run_saved_model(images, class_index), ref, case)


def test_onnx_cam_matches_reference_for_batch_of_one(small_cnn_case: ExportedCase) -> None:
    case = small_cnn_case
    for i in range(REFERENCE_BATCH):  # each image alone, at every position of the reference batch
        got = case.run_onnx(case.images[i:i + 1], case.class_index[i:i + 1])
        assert float(np.abs(got[C.CAM][0] - case.reference[C.CAM][i]).max()) <= CAM_TOL


def test_same_onnx_artifact_is_correct_for_batch_of_32(small_cnn_case: ExportedCase) -> None:
    case = small_cnn_case
    images = scene_images(32, case.images.shape[1:3], seed=3232)
    class_index = np.full(32, -1, np.int32)
    class_index[::5] = np.arange(len(class_index[::5]), dtype=np.int32) % case.num_classes
    ref = case.reference_fn(images, class_index)
    assert lively(ref[C.CAM]).sum() >= 24
    assert_matches_reference(case.run_onnx(images, class_index), ref, case)


def test_onnx_and_saved_model_agree_on_a_mixed_batch(nested_mobilenet_case: ExportedCase) -> None:
    case = nested_mobilenet_case
    onnx_out = case.run_onnx(case.images, case.class_index)
    tf_out = case.run_saved_model(case.images, case.class_index)
    np.testing.assert_array_equal(onnx_out[C.TARGET_CLASS], tf_out[C.TARGET_CLASS])
    assert float(np.abs(onnx_out[C.CAM] - tf_out[C.CAM]).max()) <= CAM_TOL


SCORES = {"softmax": "pre-softmax logit", "sigmoid": "pre-sigmoid logit", None: "model output"}


def test_target_score_is_the_logit_before_a_final_softmax_or_sigmoid(case: ExportedCase) -> None:
    got = case.run_onnx(case.images, case.class_index)
    rows = np.arange(REFERENCE_BATCH)
    picked = got[C.PREDICTIONS][rows, got[C.TARGET_CLASS]].astype(np.float64)
    score = got[C.TARGET_SCORE].astype(np.float64)
    assert case.manifest["score"] == SCORES[case.final]
    if case.final == "softmax":
        np.testing.assert_allclose(got[C.PREDICTIONS].sum(-1), 1.0, atol=1e-5)
        assert not np.allclose(score, picked, atol=1e-3)  # a logit, not the probability
    elif case.final == "sigmoid":
        np.testing.assert_allclose(1 / (1 + np.exp(-score)), picked, rtol=1e-5, atol=1e-6)
        assert not np.allclose(score, picked, atol=1e-3)
    else:
        np.testing.assert_allclose(score, picked, rtol=1e-5, atol=1e-5)


# --- the graph ----------------------------------------------------------------------------------------------------
def test_target_layer_is_the_expected_one(case: ExportedCase) -> None:
    assert case.manifest["target_layer"] == case.target_layer


@pytest.mark.filterwarnings("ignore:The structure of `inputs`")
def test_explicit_nested_layer_path_resolves_to_the_auto_target_layer(nested_mobilenet_case: ExportedCase) -> None:
    from gradcam_engine.export.locate import split_model

    case = nested_mobilenet_case
    backbone_name = case.target_layer.split("/")[0]
    explicit = split_model(case.keras_model, f"{backbone_name}/out_relu")
    auto = split_model(case.keras_model, "auto")
    assert explicit.layer_path == auto.layer_path == case.manifest["target_layer"] == f"{backbone_name}/out_relu"
    assert [layer.name for layer in explicit.head] == [layer.name for layer in auto.head] == ["pool", "classes"]
    import keras
    x = keras.applications.mobilenet_v2.preprocess_input(case.images[:2].astype(np.float32))
    np.testing.assert_allclose(np.asarray(explicit.backbone(x, training=False)),
                               case.reference[C.FEATURE_MAPS][:2], rtol=1e-4, atol=1e-4)


def test_onnx_model_passes_the_full_checker(case: ExportedCase) -> None:
    import onnx

    model = onnx.load(str(case.root / C.ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == list(C.INPUT_NAMES)
    assert {o.name for o in model.graph.output} == set(C.OUTPUT_NAMES)


def test_batch_dimension_is_dynamic_in_onnx_and_saved_model(case: ExportedCase) -> None:
    import onnx

    model = onnx.load(str(case.root / C.ONNX_FILE))
    for value in [*model.graph.input, *model.graph.output]:
        batch = value.type.tensor_type.shape.dim[0]
        assert not batch.HasField("dim_value"), f"{value.name}: fixed batch {batch.dim_value}"
    images_spec, index_spec = (case.signature.structured_input_signature[1][k] for k in C.INPUT_NAMES)
    h, w = case.images.shape[1:3]
    assert images_spec.shape.as_list() == [None, h, w, 3] and images_spec.dtype.name == "uint8"
    assert index_spec.shape.as_list() == [None] and index_spec.dtype.name == "int32"
    onnx_inputs = {i.name: i for i in case.onnx_session.get_inputs()}
    assert onnx_inputs[C.IMAGES].type == "tensor(uint8)" and onnx_inputs[C.CLASS_INDEX].type == "tensor(int32)"


# --- the manifest -------------------------------------------------------------------------------------------------
def test_manifest_documents_input_preprocessing_classes_layer_score_outputs_opset_and_versions(
        case: ExportedCase) -> None:
    m = json.loads((case.root / C.MANIFEST).read_text())
    assert m == json.loads(json.dumps(case.manifest))  # what export returned is what it wrote
    h, w = case.images.shape[1:3]
    fh, fw, fc = fm_shape(case)
    assert m["input"]["name"] == C.IMAGES and m["input"]["dtype"] == "uint8"
    assert (m["input"]["height"], m["input"]["width"]) == (h, w) and m["input"]["shape"] == ["N", h, w, 3]
    assert m["input"]["preprocessing"] == case.preprocessing
    assert m["num_classes"] == case.num_classes
    assert "class_names" in m
    assert m["target_layer"] == case.target_layer
    assert m["score"] == SCORES[case.final]
    assert (m["cam"]["height"], m["cam"]["width"], m["cam"]["channels"]) == (fh, fw, fc)
    outputs = {o["name"]: o for o in m["outputs"]}
    assert list(outputs) == list(C.OUTPUT_NAMES)
    assert outputs[C.PREDICTIONS]["shape"] == ["N", case.num_classes]
    assert outputs[C.TARGET_CLASS]["shape"] == ["N"] and outputs[C.TARGET_CLASS]["dtype"] == "int32"
    assert outputs[C.TARGET_SCORE]["shape"] == ["N"]
    assert outputs[C.FEATURE_MAPS]["shape"] == outputs[C.GRADIENTS]["shape"] == ["N", fh, fw, fc]
    assert outputs[C.CAM]["shape"] == ["N", fh, fw]
    assert isinstance(m["opset"], int) and m["opset"] >= 13
    assert set(m["versions"]) >= {"tensorflow", "keras", "tf2onnx", "onnxruntime"}
    assert all(isinstance(v, str) and v for v in m["versions"].values())


def test_manifest_class_names_are_the_ones_given(resnet50_case: ExportedCase) -> None:
    assert resnet50_case.manifest["class_names"] == ["cat", "dog"]


def test_manifest_lists_the_sha256_of_every_file(case: ExportedCase) -> None:
    files = case.manifest["files"]
    on_disk = {p.relative_to(case.root).as_posix() for p in case.root.rglob("*") if p.is_file()} - {C.MANIFEST}
    assert set(files) == on_disk
    assert C.ONNX_FILE in files and any(k.startswith(C.SAVED_MODEL_DIR + "/") for k in files)
    for rel, meta in files.items():
        assert meta["sha256"] == sha256_file(case.root / rel)
        assert meta["bytes"] == (case.root / rel).stat().st_size
    assert load_artifact(case.root).manifest["files"] == files


@pytest.mark.parametrize("victim", [C.ONNX_FILE, "saved_model/saved_model.pb"])
def test_load_artifact_detects_a_tampered_file(small_cnn_case: ExportedCase, tmp_path: Path, victim: str) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(small_cnn_case.root, copy)
    load_artifact(copy)  # the untouched copy is fine
    target = copy / victim
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(copy)
