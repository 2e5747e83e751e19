"""fp16 artifacts: parity with fp32 on real predictions, the graph's shape, the figures the manifest records, and how
the engine picks precision."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from engine_support import lively, pearson

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


def _run(path: Path, images: np.ndarray, class_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if class_index is None:
        class_index = np.full(len(images), -1, np.int32)
    outs = session.run(list(C.ENGINE_OUTPUTS), {C.IMAGES: images, C.CLASS_INDEX: class_index})
    return dict(zip(C.ENGINE_OUTPUTS, outs))


def assert_close_to_fp32(full: dict[str, np.ndarray], half: dict[str, np.ndarray], agreement: float) -> None:
    """The README's fp16 promise on real images: same top-1 (but for near-ties), every CAM a real heatmap correlated
    >= 0.99 and within 0.05 of fp32, predictions within 5%."""
    same = full[C.TARGET_CLASS] == half[C.TARGET_CLASS]
    assert same.mean() >= agreement, f"top-1 agreement {same.mean():.1%}"
    alive = lively(full[C.CAM]).mean(), lively(half[C.CAM][same]).mean()
    assert min(alive) >= 0.95, f"real heatmaps: fp32 {alive[0]:.1%}, fp16 {alive[1]:.1%} of the images"
    correlation = pearson(full[C.CAM][same], half[C.CAM][same]).min()
    assert correlation >= 0.99, f"CAM correlation down to {correlation:.4f}"
    cam_diff = np.abs(full[C.CAM][same] - half[C.CAM][same]).max()
    assert cam_diff <= 0.05, f"CAM max abs diff {cam_diff:.3f}"
    prediction_diff = np.abs(full[C.PREDICTIONS] - half[C.PREDICTIONS]).max() / np.abs(full[C.PREDICTIONS]).max()
    assert prediction_diff <= 0.05, f"predictions differ by {prediction_diff:.1%} of their scale"


def test_fp16_onnx_matches_fp32_on_real_images(both: Path, scenes: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = scenes
    assert_close_to_fp32(_run(both / C.ONNX_FILE, images), _run(both / C.ONNX_FP16_FILE, images), agreement=0.99)


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
    assert_close_to_fp32(full, half, agreement=0.95)


def xla_compiled_functions(saved_model: Path) -> list[str]:
    """The functions the serving signature reaches that carry TensorFlow's must-compile mark (jit_compile=True)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model / "saved_model.pb").read_bytes())
    meta = proto.meta_graphs[0]
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    nodes = {n.name: n for n in meta.graph_def.node}
    signature = meta.signature_def[C.SIGNATURE]
    todo: list[Any] = [nodes[t.name.split(":")[0]] for t in signature.outputs.values()]
    seen: set[str] = set()
    compiled = []
    while todo:
        node = todo.pop()
        for value in node.attr.values():
            for name in [value.func.name, *(f.name for f in value.list.func)]:
                if name in library and name not in seen:
                    seen.add(name)
                    function = library[name]
                    if "_XlaMustCompile" in function.attr and function.attr["_XlaMustCompile"].b:
                        compiled.append(name)
                    todo.extend(function.node_def)
    assert seen, "the serving signature calls no function"
    return compiled


def test_fp16_saved_model_is_xla_compiled_and_the_fp32_one_is_not(both: Path) -> None:
    compiled = xla_compiled_functions(both / C.SAVED_MODEL_FP16_DIR)
    assert [name for name in compiled if "gradcam" in name], f"no XLA-compiled Grad-CAM function: {compiled}"
    assert xla_compiled_functions(both / C.SAVED_MODEL_DIR) == []


def test_manifest_records_the_precision_of_each_file(both: Path) -> None:
    manifest = json.loads((both / C.MANIFEST).read_text())
    assert manifest["precision"] == {C.SAVED_MODEL_DIR: "fp32", C.ONNX_FILE: "fp32", C.ONNX_FP16_FILE: "fp16",
                                     C.SAVED_MODEL_FP16_DIR: "mixed_float16"}


def test_manifest_parity_figures_are_what_a_recomputation_gives(both: Path) -> None:
    """The fp16 file's figures in the manifest, recomputed here on the export's check images (seed 0, the recorded
    batch sizes) from the fp32 SavedModel and the fp16 ONNX file as written."""
    import tensorflow as tf

    manifest = json.loads((both / C.MANIFEST).read_text())
    recorded = manifest["verification"][C.ONNX_FP16_FILE]
    size = (manifest["input"]["height"], manifest["input"]["width"])
    signature = tf.saved_model.load(str(both / C.SAVED_MODEL_DIR)).signatures[C.SIGNATURE]
    rng = np.random.default_rng(0)
    figures: dict[str, list[float]] = {"predictions_rel_diff": [], "top1_agreement": [], "cam_max_abs_diff": [],
                                       "cam_min_correlation": [], "target_class_mismatches": []}
    for n in recorded["batch_sizes"]:
        images = rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
        full = {k: v.numpy() for k, v in signature(images=tf.constant(images),
                                                   class_index=tf.constant(np.full(n, -1, np.int32))).items()}
        half = _run(both / C.ONNX_FP16_FILE, images, full[C.TARGET_CLASS].astype(np.int32))
        scale = np.abs(full[C.PREDICTIONS]).max()
        figures["predictions_rel_diff"].append(np.abs(full[C.PREDICTIONS] - half[C.PREDICTIONS]).max() / scale)
        figures["top1_agreement"].append((full[C.PREDICTIONS].argmax(-1) == half[C.PREDICTIONS].argmax(-1)).mean())
        figures["cam_max_abs_diff"].append(np.abs(full[C.CAM] - half[C.CAM]).max())
        figures["cam_min_correlation"].append(pearson(full[C.CAM], half[C.CAM]).min())
        figures["target_class_mismatches"].append((full[C.TARGET_CLASS] != half[C.TARGET_CLASS]).sum())
    worst = {k: (min(v) if k in ("top1_agreement", "cam_min_correlation") else max(v)) for k, v in figures.items()}
    assert worst["cam_min_correlation"] < 1.0 and worst["cam_max_abs_diff"] > 0  # half precision, not a copy
    for name, value in worst.items():
        assert recorded[name] == pytest.approx(float(value), rel=1e-3, abs=1e-5), name
    assert worst["cam_min_correlation"] >= 0.99 and worst["predictions_rel_diff"] <= 0.05


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
