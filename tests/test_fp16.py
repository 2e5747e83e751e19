"""fp16 artifacts: parity with fp32 on real predictions, the graph's shape, and how the engine picks precision."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gradcam_engine.demo.scenes import CLASS_NAMES, make_scenes
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.session import GradCAMSession, SessionOptions, choose_precision
from gradcam_engine.export import ExportOptions, export_artifact
from gradcam_engine.export.fp16 import half_precision_nodes, remove_cascaded_casts
from gradcam_engine.export.parity import cam_correlation

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model.keras"


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "artifact"
    export_artifact(DEMO_MODEL, out, ExportOptions(precision="both", class_names=CLASS_NAMES))
    return out


@pytest.fixture(scope="module")
def scenes() -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = make_scenes(200, seed=77)
    return images, labels


def _run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(list(C.ENGINE_OUTPUTS), {C.IMAGES: images, C.CLASS_INDEX: np.full(len(images), -1, np.int32)})
    return dict(zip(C.ENGINE_OUTPUTS, outs))


def test_fp16_onnx_matches_fp32_on_real_images(both: Path, scenes: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = scenes
    full, half = _run(both / C.ONNX_FILE, images), _run(both / C.ONNX_FP16_FILE, images)
    agreement = (full[C.TARGET_CLASS] == half[C.TARGET_CLASS]).mean()
    assert agreement >= 0.99
    same = full[C.TARGET_CLASS] == half[C.TARGET_CLASS]
    assert cam_correlation(full[C.CAM][same], half[C.CAM][same]) >= 0.99
    assert np.abs(full[C.CAM][same] - half[C.CAM][same]).max() <= 0.05
    assert np.abs(full[C.CAM]).max() > 0.5  # the maps are real heatmaps, not all zeros


def test_fp16_onnx_keeps_float32_io_and_half_backbone(both: Path) -> None:
    model = onnx.load(str(both / C.ONNX_FP16_FILE))
    onnx.checker.check_model(model, full_check=True)
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert types[C.IMAGES] == onnx.TensorProto.UINT8
    assert all(types[name] in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32) for name in C.OUTPUT_NAMES)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert conv_weights and all(inits[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)
    # the preprocessing, head and CAM stay float32: no node of theirs writes an fp16 tensor
    inferred = onnx.shape_inference.infer_shapes(model).graph
    half = {v.name for v in inferred.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    outside = [n for n in inferred.node if n.name.startswith(("preprocess/", "head/", "cam/"))
               and not n.name.endswith("__as_fp16")]  # the casts that feed the backbone are named for their input
    assert outside and not [n.name for n in outside if half.intersection(n.output)]
    assert half_precision_nodes(model.graph) >= {n.name for n in model.graph.node if n.op_type == "Conv"}
    assert remove_cascaded_casts(model) == 0  # no round trips left


def test_fp16_saved_model_matches_fp32(both: Path, scenes: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = scenes
    full = GradCAMSession(both, SessionOptions(backend="onnx", precision="fp32"))({C.IMAGES: images[:32]})
    half = GradCAMSession(both, SessionOptions(backend="tf", precision="fp16"))({C.IMAGES: images[:32]})
    same = full[C.TARGET_CLASS] == half[C.TARGET_CLASS]
    assert same.mean() >= 0.95
    assert cam_correlation(full[C.CAM][same], half[C.CAM][same]) >= 0.99
    assert np.abs(full[C.CAM][same] - half[C.CAM][same]).max() <= 0.05


def test_manifest_records_the_precision_of_each_file(both: Path) -> None:
    import json

    manifest = json.loads((both / C.MANIFEST).read_text())
    assert manifest["precision"] == {C.SAVED_MODEL_DIR: "fp32", C.ONNX_FILE: "fp32", C.ONNX_FP16_FILE: "fp16",
                                     C.SAVED_MODEL_FP16_DIR: "mixed_float16"}
    assert manifest["verification"][C.ONNX_FP16_FILE]["cam_min_correlation"] >= 0.99


def test_engine_picks_fp16_on_cuda_and_fp32_on_cpu() -> None:
    both = {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
    assert choose_precision("auto", "cuda", both) == "fp16"
    assert choose_precision("auto", "cpu", both) == "fp32"
    assert choose_precision("auto", "cpu", {"fp16": "model_fp16.onnx"}) == "fp16"
    with pytest.raises(RunError, match="no fp16 file"):
        choose_precision("fp16", "cpu", {"fp32": "model.onnx"})


def test_fixed_batch_padding_and_io_binding_do_not_change_results(both: Path,
                                                                 scenes: tuple[np.ndarray, np.ndarray]) -> None:
    images = scenes[0][:5]
    plain = GradCAMSession(both)({C.IMAGES: images})
    for options in (SessionOptions(fixed_batch=8), SessionOptions(io_binding=True),
                    SessionOptions(fixed_batch=8, io_binding=True)):
        got = GradCAMSession(both, options)({C.IMAGES: images})
        assert got[C.CAM].shape == plain[C.CAM].shape
        for name in C.ENGINE_OUTPUTS:
            np.testing.assert_array_equal(got[name], plain[name])
