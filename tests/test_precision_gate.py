"""The precision gate: reduced-precision files judged on what users see (top-1, CAM correlation), refused with the
figure and its likely cause, kept on request; and fp16 made as accurate as it cheaply can be by keeping the front of
the backbone in fp32 when full fp16 misses the gate."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from gradcam_engine.engine import contract as C
from gradcam_engine.export import ExportOptions, export_artifact
from gradcam_engine.export.errors import PrecisionGateError
from gradcam_engine.export.gate import judge, likely_cause
from gradcam_engine.export.parity import precision_figures
from precision_support import pearson, run_onnx


def _outputs(predictions: list[list[float]], cams: np.ndarray) -> dict[str, np.ndarray]:
    p = np.asarray(predictions, np.float32)
    return {C.PREDICTIONS: p, C.TARGET_CLASS: p.argmax(-1).astype(np.int32), C.CAM: cams.astype(np.float32)}


def test_gate_judges_cam_correlation_and_top1_not_max_abs_diff() -> None:
    rng = np.random.default_rng(0)
    cams = rng.uniform(0, 1, (100, 3, 3))
    reference = _outputs([[0.9, 0.1]] * 100, cams)
    moved = cams.copy()
    moved[:, 0, 0] += 0.08  # one cell of a 3x3 map moves by 0.08: max abs diff 0.08, the maps still correlate
    figures = precision_figures(reference, _outputs([[0.89, 0.11]] * 100, moved))
    assert figures["cam_max_abs_diff"] == pytest.approx(0.08, abs=1e-6)
    assert figures["cam_corr_mean"] > 0.98 and judge("int8", figures).passed
    scrambled = _outputs([[0.9, 0.1]] * 100, rng.uniform(0, 1, (100, 3, 3)))
    verdict = judge("int8", precision_figures(reference, scrambled))
    assert verdict.failed == ["cam_corr_mean", "cam_corr_worst"]


def test_top1_changes_on_near_ties_are_counted_apart_and_decisive_ones_fail() -> None:
    cams = np.random.default_rng(1).uniform(0, 1, (100, 3, 3))
    near = [[0.501, 0.499]] + [[0.9, 0.1]] * 99          # fp32 itself scores the two classes 0.002 apart
    flipped_near = [[0.499, 0.501]] + [[0.9, 0.1]] * 99
    figures = precision_figures(_outputs(near, cams), _outputs(flipped_near, cams))
    assert figures["top1_agreement"] == 0.99 and figures["top1_changed_near_ties"] == 1
    assert figures["top1_agreement_beyond_ties"] == 1.0
    decisive = [[0.1, 0.9]] * 2 + [[0.9, 0.1]] * 98
    figures = precision_figures(_outputs([[0.9, 0.1]] * 100, cams), _outputs(decisive, cams))
    assert figures["top1_agreement_beyond_ties"] == 0.98 and figures["top1_largest_margin_changed"] == pytest.approx(
        0.8 / 0.9)
    assert judge("fp16", figures).failed == ["top1_agreement_beyond_ties"]


def test_every_methods_map_is_judged_and_eigencam_only_where_its_direction_is_defined() -> None:
    from gradcam_engine.export.gate import refusal

    n, methods = 40, ("gradcam", "gradcampp", "eigencam")
    rng = np.random.default_rng(2)
    cams = rng.uniform(0, 1, (n, 3, 4, 4))
    # 2x2 feature maps, 2 channels: rank one on even images (eigen-gap 1), two equal directions on odd ones (gap 0)
    defined = np.arange(n) % 2 == 0
    cells = np.zeros((n, 4, 2))
    cells[:, :, 0] = [1, -1, 0, 0]
    cells[defined, :, 1] = [2, -2, 0, 0]
    cells[~defined, :, 1] = [0, 0, 1, -1]
    reference = {**_outputs([[0.9, 0.1]] * n, cams[:, 0]), C.CAMS: cams.astype(np.float32),
                 C.FEATURE_MAPS: cells.reshape(n, 2, 2, 2)}
    moved = cams.copy()
    moved[~defined, 2] = rng.uniform(0, 1, (n // 2, 4, 4))  # Eigen-CAM differs only where any direction is right
    figures = precision_figures(reference, {**reference, C.CAMS: moved.astype(np.float32)}, methods)
    assert list(figures["methods"]) == list(methods)
    eigen = figures["methods"]["eigencam"]
    assert eigen["images"] == 20 and eigen["skipped"] == 20 and eigen["cam_corr_worst"] == pytest.approx(1.0)
    assert judge("fp16", figures).passed

    moved[:, 1] = rng.uniform(0, 1, (n, 4, 4))  # Grad-CAM++'s maps move; `cam` (the first method's) does not
    verdict = judge("fp16", precision_figures(reference, {**reference, C.CAMS: moved.astype(np.float32)}, methods))
    assert verdict.failed == ["cam_corr_mean[gradcampp]", "cam_corr_worst[gradcampp]"]
    assert verdict.figures["cam_corr_mean"] == pytest.approx(1.0)
    assert "the gradcampp map moves more under fp16 rounding than the first method's" in likely_cause(verdict)
    assert "cam_corr_mean[gradcampp] 0." in refusal(C.ONNX_FP16_FILE, verdict)


def _underflowing_cnn() -> Any:
    """A small CNN whose BatchNorm divides by 1e10 (as never-calibrated statistics do in a deep net, compounded):
    its activations are ~1e-10, below fp16's range, while fp32 computes them and real CAMs from them."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    bn = keras.layers.BatchNormalization(name="bn")
    x = keras.layers.ReLU()(bn(x))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name="underflowing_cnn")
    gamma, beta, mean, variance = bn.get_weights()
    bn.set_weights([gamma, beta, mean, np.full_like(variance, 1e20)])
    return model


def test_an_underflowing_model_is_refused_with_the_cause_and_the_fp32_artifact_still_written(tmp_path: Path) -> None:
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    root = tmp_path / "a"
    with pytest.raises(PrecisionGateError) as refused:
        export_artifact(_underflowing_cnn(), root, ExportOptions(layer="last_conv", precision="fp16"))
    message = str(refused.value)
    assert "\n" not in message
    assert "model_fp16.onnx misses the precision gate: cam_corr_mean 0.0000 < 0.999" in message
    assert re.search(r"feature maps peak at \d\.\de-(08|09|10|11), below fp16's smallest normal 6\.1e-05", message)
    assert "calibrate the BatchNorm statistics or export fp32" in message
    assert f"{root} is written without it and runs as is (fp32); pass --keep-failing to write it anyway" in message
    # the fp32 export is not thrown away: written with its manifest, the refused file's verdict in it, and it runs
    assert refused.value.root == root and refused.value.refused == [C.ONNX_FP16_FILE]
    assert (root / C.ONNX_FILE).exists() and (root / C.SAVED_MODEL_DIR).is_dir()
    assert not (root / C.ONNX_FP16_FILE).exists() and not (root / C.SAVED_MODEL_FP16_DIR).exists()
    manifest = json.loads((root / C.MANIFEST).read_text())
    assert manifest == refused.value.manifest and set(manifest["precision"]) == {C.ONNX_FILE, C.SAVED_MODEL_DIR}
    gate = manifest["precision_gate"]
    assert gate["refused"] == [C.ONNX_FP16_FILE]
    entry = gate["results"][C.ONNX_FP16_FILE]
    assert not entry["passed"] and "kept_although_failed" not in entry and entry["failed"][:1] == ["cam_corr_mean"]
    assert manifest["verification"][C.SAVED_MODEL_FP16_DIR].startswith("skipped: the fp16 ONNX misses the precision")
    images = np.random.default_rng(5).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    session = GradCAMSession(root)  # the manifest's checksums hold
    assert session.precision == "fp32"
    np.testing.assert_array_equal(session({C.IMAGES: images})[C.CAM], run_onnx(root / C.ONNX_FILE, images)[C.CAM])
    with pytest.raises(RunError, match="the artifact has no fp16 file"):
        GradCAMSession(root, SessionOptions(precision="fp16"))


@pytest.fixture(scope="module")
def underflowing_keras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("underflowing") / "underflowing.keras"
    _underflowing_cnn().save(path)
    return path


def test_export_command_writes_fp32_prints_the_refusal_and_exits_2(
        underflowing_keras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    out = tmp_path / "cli"
    assert main(["export", str(underflowing_keras), "--out", str(out), "--layer", "last_conv",
                 "--precision", "fp16"]) == 2
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradcam export: error: model_fp16.onnx misses the precision")
    assert f"{out} is written without it and runs as is (fp32)" in err
    assert "model_fp16.onnx: top-1 agreement" in printed.out and "FAILED cam_corr_mean" in printed.out
    assert "not written" in printed.out  # what was written, with the gate's figures, is printed first
    assert (out / C.ONNX_FILE).exists() and not (out / C.ONNX_FP16_FILE).exists()


def test_an_underflowing_model_is_kept_only_on_request(underflowing_keras: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions, gate_passed

    assert main(["export", str(underflowing_keras), "--out", str(tmp_path / "kept"), "--layer",
                 "last_conv", "--precision", "fp16", "--keep-failing"]) == 0
    printed = capsys.readouterr().out  # the figures are printed either way, with the outcome
    assert "model_fp16.onnx: top-1 agreement" in printed and "FAILED cam_corr_mean" in printed
    assert "kept (--keep-failing)" in printed
    manifest = json.loads((tmp_path / "kept" / C.MANIFEST).read_text())
    entry = manifest["precision_gate"]["results"][C.ONNX_FP16_FILE]
    assert not entry["passed"] and entry["kept_although_failed"] and entry["failed"][:1] == ["cam_corr_mean"]
    assert "refused" not in manifest["precision_gate"]
    assert entry["figures"]["feature_maps_peak"] < 6e-8 and entry["figures"]["cams_lost"] == 32
    assert manifest["precision_gate"]["images"]["kind"] == "random"
    images = np.random.default_rng(5).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    full = run_onnx(tmp_path / "kept" / C.ONNX_FILE, images, outputs=(C.CAM, C.FEATURE_MAPS))
    assert (full[C.CAM].reshape(8, -1).max(-1) == 1.0).all()          # fp32: real heatmaps from tiny activations
    assert 0 < np.abs(full[C.FEATURE_MAPS]).max() < 6e-8  # below even fp16 subnormals
    session = GradCAMSession(tmp_path / "kept", SessionOptions(precision="fp16"))  # asked for explicitly: it runs
    assert session.precision == "fp16" and not gate_passed(session.artifact, C.ONNX_FP16_FILE)


def _mobilenet_v2(calibrate_batchnorm: bool) -> Any:
    """The held-out case: MobileNetV2 (alpha 0.35, 96x96, random weights) + GAP + Dense(4, softmax); BatchNorm
    statistics set from data by one training-mode pass with momentum 0 over 64 scenes."""
    import keras

    from gradcam_engine.demo.scenes import make_scenes

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, include_top=False)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base.output)
    model = keras.Model(base.input, keras.layers.Dense(4, activation="softmax", name="probs")(x), name="mnv2_035")
    if calibrate_batchnorm:
        norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        for layer in norms:
            layer.momentum = 0.0
        model(make_scenes(64, 7)[0].astype("float32") / 127.5 - 1.0, training=True)
    return model


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gradcam_engine.demo.scenes import write_scene_files

    tmp = tmp_path_factory.mktemp("mobilenet")
    write_scene_files(tmp / "scenes", 200, 9)
    manifest = export_artifact(_mobilenet_v2(calibrate_batchnorm=True), tmp / "artifact",
                               ExportOptions(preprocessing="tf", precision="both", calibrate=[str(tmp / "scenes")]))
    return {"root": tmp / "artifact", "manifest": manifest}


@pytest.fixture(scope="module")
def default_batchnorm_mobilenet(tmp_path_factory: pytest.TempPathFactory) -> PrecisionGateError:
    """The same MobileNetV2 with Keras' default BatchNorm statistics, exported with fp16 (judged on random images)."""
    root = tmp_path_factory.mktemp("mobilenet_default_bn") / "artifact"
    with pytest.raises(PrecisionGateError) as refused:
        export_artifact(_mobilenet_v2(calibrate_batchnorm=False), root, ExportOptions(preprocessing="tf",
                                                                                       precision="fp16"))
    return refused.value


def test_mobilenet_v2_with_default_batchnorm_is_refused_fp16_for_underflow(
        default_batchnorm_mobilenet: PrecisionGateError) -> None:
    refused = default_batchnorm_mobilenet
    message = str(refused)
    assert "\n" not in message and message.startswith("model_fp16.onnx misses the precision gate: cam_corr_mean ")
    assert re.search(r"feature maps peak at \d\.\de-\d\d, below fp16's smallest normal 6\.1e-05: the model's "
                     r"activations underflow in half precision", message)
    entry = refused.manifest["precision_gate"]["results"][C.ONNX_FP16_FILE]
    assert entry["fp32_front"] == {**entry["fp32_front"], "convolutions": 26, "of": 52}  # every front was tried
    assert 0 < entry["figures"]["feature_maps_peak"] < 6.1e-5
    # fp32 computes real, varied heatmaps from those tiny activations: the refusal is fp16's, not the model's
    images = np.random.default_rng(6).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
    full = run_onnx(refused.root / C.ONNX_FILE, images)
    assert (full[C.CAM].reshape(8, -1).max(-1) == 1.0).all() and full[C.CAM].std() > 0.05
    assert not (refused.root / C.ONNX_FP16_FILE).exists()


def test_mobilenet_v2_with_calibrated_batchnorm_exports_fp16_with_its_front_in_fp32(mobilenet: dict[str, Any]) -> None:
    from gradcam_engine.demo.scenes import make_scenes
    from gradcam_engine.export.fp16 import to_fp16

    root, gate = mobilenet["root"], mobilenet["manifest"]["precision_gate"]
    entry = gate["results"][C.ONNX_FP16_FILE]
    assert entry["passed"] and gate["images"]["kind"] == "held-out calibration images"
    front = entry["fp32_front"]
    assert 0 < front["convolutions"] < front["of"] / 4 and front["of"] == 52
    written = onnx.load(str(root / C.ONNX_FP16_FILE)).graph
    weights = {i.name: i.data_type for i in written.initializer}
    in_fp32 = [n.name for n in written.node if n.op_type == "Conv" and weights[n.input[1]] == onnx.TensorProto.FLOAT]
    assert len(in_fp32) == front["convolutions"]  # the file is fp16 but for that front

    images = make_scenes(200, 2026)[0]  # scenes neither calibration nor the gate saw
    full = run_onnx(root / C.ONNX_FILE, images, outputs=(C.PREDICTIONS, C.TARGET_CLASS, C.CAM, C.FEATURE_MAPS))
    assert np.abs(full[C.FEATURE_MAPS]).max() > 1.0  # calibrated statistics: activations well inside fp16's range
    assert (full[C.CAM].reshape(len(images), -1).max(-1) == 1.0).all()
    half = run_onnx(root / C.ONNX_FP16_FILE, images, full[C.TARGET_CLASS])
    # top-1 as the gate counts it: a random-weight 4-class model has near-ties (5% of these images have fp32 top-2
    # margins under 1.3%), which any rounding may swap; a decisive change counts
    assert precision_figures(full, half)["top1_agreement_beyond_ties"] >= 0.99
    kept = pearson(full[C.CAM], half[C.CAM])
    assert kept.mean() >= 0.999 and kept.min() >= 0.99

    # the front is what closes the gap: the same graph all in fp16 is measurably further from fp32
    all_half = root.parent / "all_fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(root / C.ONNX_FILE))), str(all_half))
    everywhere = pearson(full[C.CAM], run_onnx(all_half, images, full[C.TARGET_CLASS])[C.CAM])
    assert everywhere.mean() < 0.999 and everywhere.min() < kept.min()


def test_mobilenet_v2_fp16_saved_model_is_skipped_with_its_figures(mobilenet: dict[str, Any]) -> None:
    manifest = mobilenet["manifest"]
    entry = manifest["precision_gate"]["results"][C.SAVED_MODEL_FP16_DIR]
    assert not entry["passed"] and entry["figures"]["cam_corr_mean"] < 0.999  # fp16 throughout, no fp32 front
    assert C.SAVED_MODEL_FP16_DIR not in manifest["precision"]
    assert manifest["verification"][C.SAVED_MODEL_FP16_DIR].startswith("skipped: misses the precision gate")
    assert not (mobilenet["root"] / C.SAVED_MODEL_FP16_DIR).exists()
    written = json.loads((mobilenet["root"] / C.MANIFEST).read_text())
    assert written["precision_gate"] == manifest["precision_gate"]


def test_mobilenet_v2_judged_on_random_images_also_exports_fp16(mobilenet: dict[str, Any]) -> None:
    """Exported without calibration images: the gate then judges on seeded random images."""
    from gradcam_engine.export.calibration import load_gate_images
    from gradcam_engine.export.precisions import Gate, fp16_with_fp32_front

    proto = onnx.load(str(mobilenet["root"] / C.ONNX_FILE))
    _, verdict = fp16_with_fp32_front(proto, Gate.on(proto, load_gate_images(None, 0, (96, 96))))
    assert verdict.passed and verdict.figures["images"] == 32
    assert verdict.figures["cam_corr_mean"] >= 0.999 and verdict.figures["top1_agreement"] >= 0.99


def test_resnet50_stays_all_fp16(resnet50_case: Any) -> None:
    from gradcam_engine.export.calibration import load_gate_images
    from gradcam_engine.export.precisions import Gate, fp16_with_fp32_front

    proto = onnx.load(str(resnet50_case.root / C.ONNX_FILE))
    half, verdict = fp16_with_fp32_front(proto, Gate.on(proto, load_gate_images(None, 0, (96, 96))))
    assert verdict.passed and verdict.notes == {"fp32_front": {"convolutions": 0, "of": 53, "nodes": 0}}
    weights = {i.name: i.data_type for i in half.graph.initializer}
    convs = [n for n in half.graph.node if n.op_type == "Conv"]
    assert len(convs) == 53 and all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)


def test_the_fp32_front_is_the_first_convolutions_and_what_feeds_them(mobilenet: dict[str, Any]) -> None:
    from gradcam_engine.export.fp16 import front_nodes, front_steps, half_precision_nodes

    graph = onnx.load(str(mobilenet["root"] / C.ONNX_FILE)).graph
    assert front_steps(graph) == [4, 7, 13, 26]
    front = front_nodes(graph, 4)
    order = {n.name: i for i, n in enumerate(graph.node)}
    backbone_convs = [n.name for n in graph.node if n.op_type == "Conv" and n.name in half_precision_nodes(graph)]
    assert [n for n in backbone_convs if n in front] == backbone_convs[:4]
    producer = {out: n.name for n in graph.node for out in n.output}
    half = half_precision_nodes(graph)
    for name in front:  # closed upstream: whatever a front node reads from the backbone is in the front too
        node = next(n for n in graph.node if n.name == name)
        assert all(producer[x] in front for x in node.input if producer.get(x) in half), name
    assert max(order[n] for n in front) < order[backbone_convs[4]]
