"""The GPU check script runs end to end (on the CPU, dry run), so device time is never spent debugging it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.bench.tools import gpu_check
from gradcam_engine.bench.tools.onnx_weights import fill_weights, strip_weights
from gradcam_engine.engine import contract as C
from gradcam_engine.export.fp16 import to_fp16
from gradcam_engine.export.methods import method_names
from engine_support import lively, pearson


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="last")(x)  # 2,304 weights: stripped
    x = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    root = tmp_path_factory.mktemp("gpu")
    keras.Model(inputs, x).save(root / "m.keras")
    return gpu_check.prepare(str(root / "m.keras"), root / "prepared", "none")


def test_prepared_graphs_travel_without_their_weights(prepared: Path) -> None:
    for name in (gpu_check.FUSED, gpu_check.FORWARD):
        model = onnx.load(str(prepared / name))
        stripped = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and
                    not i.raw_data and not i.float_data]
        assert stripped, "the large weights are stripped"
        filled = fill_weights(model, seed=0)
        onnx.checker.check_model(filled, full_check=True)
        assert not any(p.key == "gradcam.stripped" for p in filled.metadata_props)


def test_forward_graph_converts_to_fp16_like_the_fused_one(prepared: Path) -> None:
    forward = to_fp16(fill_weights(onnx.load(str(prepared / gpu_check.FORWARD))))
    kernels = {n.input[1] for n in forward.graph.node if n.op_type == "Conv"}
    types = {i.name: i.data_type for i in forward.graph.initializer}
    assert kernels and all(types[k] == onnx.TensorProto.FLOAT16 for k in kernels)


def test_strip_and_fill_keep_shapes_and_small_constants() -> None:
    from onnx import helper, numpy_helper
    import numpy as np

    big = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    small = numpy_helper.from_array(np.arange(3, dtype=np.float32), "mean")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])], [big, small])
    filled = fill_weights(strip_weights(helper.make_model(graph)), seed=1)
    values = {i.name: numpy_helper.to_array(i) for i in filled.graph.initializer}
    assert values["w"].shape == (64, 32) and 0.05 < values["w"].std() < 0.3  # LeCun: 1/sqrt(64)
    np.testing.assert_array_equal(values["mean"], [0, 1, 2])


# Run as on the GPU machine, which has ONNX Runtime but no TensorFlow: importing any of these raises ImportError.
WITHOUT_TENSORFLOW = ("import runpy, sys\n"
                      "for name in ('tensorflow', 'keras', 'tf_keras', 'tf2onnx'):\n"
                      "    sys.modules[name] = None\n"
                      "runpy.run_module('gradcam_engine.bench.tools.gpu_check', run_name='__main__')\n")


@pytest.fixture(scope="module")
def dry_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_report") / "report.json"
    done = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, "check", str(prepared), "--batch-sizes", "2", "4",
                           "--dry-run", "--json", str(out)], capture_output=True, text=True, cwd="/", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_reports_every_figure_the_gpu_check_needs(dry_run: dict[str, Any]) -> None:
    report = dry_run
    rows = report["model_only"]
    assert {(r["precision"], r["batch"], r["feed"]) for r in rows} == {
        (p, b, f) for p in ("fp32", "fp16") for b in (2, 4) for f in ("host", "io_binding")}
    for r in rows:
        assert r["gradcam_img_s"] > 0 and r["forward_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["gradcam_img_s"] / r["forward_img_s"])
    assert set(report["fp16_parity"]) == {"images", "top1_agreement", "cam_min_correlation", "cam_max_abs_diff",
                                          "methods", "cams_max_abs_diff", "cams_min_correlation"}
    assert set(report["fp16_parity"]["cams_min_correlation"]) == set(report["fp16_parity"]["methods"]) == \
        set(method_names())  # every method's fp16 map is checked on the GPU too
    assert report["end_to_end"]["images"] == 24 and report["end_to_end"]["end_to_end_img_s"] > 0
    assert [e["batch"] for e in report["engine_host_fed"]] == [2, 4]
    assert report["best_model_only"]["gradcam_img_s"] == max(r["gradcam_img_s"] for r in rows)


def _outputs(path: Path, images: np.ndarray, class_index: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS), {C.IMAGES: images,
                                                                              C.CLASS_INDEX: class_index})))


def test_the_rebuilt_fp16_graph_agrees_with_fp32_on_scenes_and_the_report_says_so(
        prepared: Path, dry_run: dict[str, Any], tmp_path: Path) -> None:
    """fp16 parity computed here, on the graphs the check rebuilds (same seed), not read from the check's report."""
    paths = gpu_check.rebuild(prepared, tmp_path / "rebuilt")
    half_model = onnx.load(str(paths["artifact"] / C.ONNX_FP16_FILE))
    kernels = {n.input[1] for n in half_model.graph.node if n.op_type == "Conv"}
    assert kernels and all(i.data_type == onnx.TensorProto.FLOAT16 for i in half_model.graph.initializer
                           if i.name in kernels)

    images = scene_images(16, (32, 32), seed=9)
    full = _outputs(paths["artifact"] / C.ONNX_FILE, images, np.full(len(images), -1, np.int32))
    half = _outputs(paths["artifact"] / C.ONNX_FP16_FILE, images, full[C.TARGET_CLASS])
    assert lively(full[C.CAM]).mean() >= 0.9
    assert pearson(full[C.CAM], half[C.CAM]).min() >= 0.99
    assert np.abs(full[C.CAM] - half[C.CAM]).max() <= 0.05
    assert np.abs(full[C.PREDICTIONS] - half[C.PREDICTIONS]).max() <= 0.05 * np.abs(full[C.PREDICTIONS]).max()

    # The report's figures are those of these two files on its own images (8 uniform images, seed 1).
    reported = dry_run["fp16_parity"]
    noise = np.random.default_rng(1).integers(0, 256, (reported["images"], 32, 32, 3), dtype=np.uint8)
    full = _outputs(paths["artifact"] / C.ONNX_FILE, noise, np.full(len(noise), -1, np.int32))
    half = _outputs(paths["artifact"] / C.ONNX_FP16_FILE, noise, full[C.TARGET_CLASS])
    assert reported["cam_min_correlation"] == pytest.approx(pearson(full[C.CAM], half[C.CAM]).min(), abs=1e-6)
    assert reported["cam_max_abs_diff"] == pytest.approx(np.abs(full[C.CAM] - half[C.CAM]).max(), abs=1e-6)
    assert reported["top1_agreement"] == pytest.approx(
        (full[C.PREDICTIONS].argmax(-1) == half[C.PREDICTIONS].argmax(-1)).mean())
    assert reported["cam_max_abs_diff"] > 0  # half precision, not the fp32 file twice
