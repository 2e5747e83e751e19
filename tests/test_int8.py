"""int8 artifacts: calibrated on the user's images, quantized in the backbone only, close to fp32 on what users see,
and run by `gradcam run --precision int8`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow.dataset as ds
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcam_engine.demo.scenes import pointing_hits
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.cpu import INT8_FEATURES, cpu_features
from gradcam_engine.export import ExportOptions, export_artifact
from gradcam_engine.export.errors import ExportError
from gradcam_engine.export.int8 import split_shared_constants
from precision_support import DEMO_MODEL, DemoPrecisions, demo_precisions, held_out_scenes, pearson, run_onnx

OUTSIDE_BACKBONE = ("preprocess/", "head/", "cam/")
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPrecisions:
    return demo_precisions(tmp_path_factory)


def test_int8_needs_the_users_images_to_calibrate(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--precision int8 needs --calibrate IMAGES"):
        export_artifact(DEMO_MODEL, tmp_path / "a", ExportOptions(precision="fp32,int8"))
    with pytest.raises(ExportError, match="3 images found .* at least 16"):
        for i in range(3):
            (tmp_path / f"{i}.png").write_bytes(b"")
        export_artifact(DEMO_MODEL, tmp_path / "a", ExportOptions(precision="int8", calibrate=[str(tmp_path)]))
    assert not (tmp_path / "a").exists()


def test_too_small_a_calibration_sample_is_refused_up_front_with_its_own_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main
    from gradcam_engine.demo.scenes import write_scene_files

    write_scene_files(tmp_path / "scenes", 20, 3)  # enough images; too small a sample asked for
    assert main(["export", str(DEMO_MODEL), "--out", str(tmp_path / "a"), "--precision", "int8", "--calibrate",
                 str(tmp_path / "scenes"), "--calibration-images", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gradcam export: error: --calibration-images 10: calibration and the precision gate need a sample "
                   "of at least 16 images (default 200)")
    assert not (tmp_path / "a").exists()


def test_calibration_and_gate_images_are_decoded_as_gradcam_run_decodes_them(tmp_path: Path) -> None:
    from PIL import Image

    from gradcam_engine.demo.scenes import write_scene_files
    from gradcam_engine.engine.decode import decode_image
    from gradcam_engine.export.calibration import list_calibration, load_gate_images

    write_scene_files(tmp_path / "scenes", 39, 4, size=150)  # JPEGs the model's 96x96 input needs resized
    gray = tmp_path / "scenes" / "gray.png"                   # and a grayscale PNG of another shape
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 130), dtype=np.uint8)).save(gray)
    specs = [str(tmp_path / "scenes")]
    items = list_calibration(specs, 200)  # all 40, in the order calibration takes them
    assert len(items) == 40 and str(gray) in [item.key for item in items]
    engine = np.stack([decode_image(Path(item.key).read_bytes(), (96, 96)).pixels for item in items])
    images = load_gate_images(specs, 200, (96, 96))
    held = np.arange(40) % 4 == 3
    np.testing.assert_array_equal(images.held_out, engine[held])
    np.testing.assert_array_equal(images.calibration, engine[~held])


def test_int8_agrees_with_fp32_on_held_out_demo_scenes(demo: DemoPrecisions) -> None:
    images, labels, boxes = held_out_scenes()
    full = run_onnx(demo.root / C.ONNX_FILE, images)
    own = run_onnx(demo.root / C.ONNX_INT8_FILE, images)                              # int8's own top-1
    same = run_onnx(demo.root / C.ONNX_INT8_FILE, images, full[C.TARGET_CLASS])       # fp32's classes: CAMs compare
    assert (full[C.PREDICTIONS].argmax(-1) == labels).mean() >= 0.95  # a trained model: top-1 and CAMs mean something
    assert (full[C.CAM].reshape(len(images), -1).max(-1) == 1.0).mean() >= 0.99      # real heatmaps, not zeros
    assert (own[C.PREDICTIONS].argmax(-1) == full[C.PREDICTIONS].argmax(-1)).mean() >= 0.99
    correlation = pearson(full[C.CAM], same[C.CAM])
    assert correlation.mean() >= 0.98
    assert np.abs(full[C.CAM] - same[C.CAM]).max() > 1e-3  # int8 really ran: CAMs are not fp32's
    size = images.shape[1:3]
    assert abs(pointing_hits(own[C.CAM], boxes, size).mean() - pointing_hits(full[C.CAM], boxes, size).mean()) <= 0.01


def test_int8_graph_quantizes_the_backbone_and_nothing_else(demo: DemoPrecisions) -> None:
    model = onnx.load(str(demo.root / C.ONNX_INT8_FILE))
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {i.name: i for i in graph.initializer}
    # (the quantizer names its Quantize/Dequantize nodes after the tensor they carry, which may be a constant named in
    # another scope that tf2onnx shared with the backbone: those are the backbone's, whatever their name)
    outside = [n for n in graph.node if n.name.startswith(OUTSIDE_BACKBONE) and n.op_type not in QDQ]
    assert {n.name.split("/")[0] for n in outside} == {"preprocess", "head", "cam"}
    for node in outside:  # the preprocessing, head, gradient rules and CAM read float tensors made by float ops
        fed_by = [producer[x].op_type for x in node.input if x in producer]
        assert not set(fed_by) & set(QDQ), node.name
        assert all(inits[x].data_type not in (TensorProto.INT8, TensorProto.UINT8) for x in node.input if x in inits)
    assert producer[C.FEATURE_MAPS].op_type not in QDQ
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producer[n.input[1]].op_type == "DequantizeLinear"
                         and inits[producer[n.input[1]].input[0]].data_type == TensorProto.INT8 for n in convs)
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in convs)  # uint8 activations in
    # the preprocessing's 0.0, read by the backbone and by the head's and CAM's comparisons, was split
    copies = [name for name in inits if name.endswith("__float")]
    readers = {name: [n.name for n in graph.node if name in n.input] for name in copies}
    assert copies and all(r and all(x.startswith(OUTSIDE_BACKBONE) for x in r) for r in readers.values())
    calibration = demo.manifest["precision_gate"]["results"][C.ONNX_INT8_FILE]["calibration"]
    assert calibration["split_constants"] == len(copies) and calibration["calibration_images"] == 150


def test_split_shared_constants_gives_the_float_readers_their_own_copy() -> None:
    c = numpy_helper.from_array(np.array([2.0], np.float32), "c")
    nodes = [helper.make_node("Mul", ["x", "c"], ["a"], name="backbone/mul"),
             helper.make_node("Add", ["a", "c"], ["y"], name="head/add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [c])
    model = helper.make_model(graph)
    assert split_shared_constants(model, {"backbone/mul"}) == 1
    assert list(model.graph.node[0].input) == ["x", "c"] and list(model.graph.node[1].input) == ["a", "c__float"]
    held = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert held["c__float"].dtype == np.float32 and held["c__float"].tolist() == [2.0] == held["c"].tolist()
    assert split_shared_constants(model, {"backbone/mul", "head/add"}) == 0  # every reader quantized: nothing to do


def test_gate_figures_are_recorded_and_printed(demo: DemoPrecisions) -> None:
    gate = demo.manifest["precision_gate"]
    assert gate["images"]["kind"] == "held-out calibration images"
    assert gate["images"]["images"] == 50 and gate["images"]["calibration"] == 150
    entry = gate["results"][C.ONNX_INT8_FILE]
    assert entry["passed"] and entry["limits"]["cam_corr_mean"] == 0.98
    # ONNX Runtime's int8 kernels differ by CPU (VNNI or not): the figures name the CPU they were judged on
    assert entry["cpu"] == cpu_features() and set(INT8_FEATURES) <= set(entry["cpu"])
    assert entry["figures"]["cam_corr_mean"] >= 0.98 and entry["figures"]["top1_agreement"] >= 0.98
    assert demo.manifest["precision"][C.ONNX_INT8_FILE] == "int8"
    assert "precision gate vs fp32 on 50 held-out calibration images" in demo.printed
    assert f"{C.ONNX_INT8_FILE}: top-1 agreement" in demo.printed and ": passed" in demo.printed


def test_export_int8_then_run_int8_from_the_command_line(demo: DemoPrecisions, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcam_engine.cli.main import main
    from gradcam_engine.engine import cpu

    flags = cpu.cpu_flags() | {"avx512_vnni"}  # `fast` picks int8 only on a CPU with int8 dot products: be one
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    from gradcam_engine.engine.decode import decode_image
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    files = sorted(demo.scenes.glob("*.jpg"))[:24]
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in files))
    chosen = {}
    for precision in ("int8", "fast", "auto"):
        out = tmp_path / precision
        assert main(["run", str(demo.root), str(listing), "--out", str(out), "--precision", precision]) == 0
        chosen[precision] = json.loads((out / "run.json").read_text())["precision"]
    assert chosen == {"int8": "int8", "fast": "int8", "auto": "fp32"}  # auto never picks int8
    rows = {r["path"]: r for r in ds.dataset(tmp_path / "int8" / "results").to_table().to_pylist()}
    pixels = np.stack([decode_image(p.read_bytes(), (96, 96)).pixels for p in files])
    direct = GradCAMSession(demo.root, SessionOptions(precision="int8"))({C.IMAGES: pixels})
    fp32 = GradCAMSession(demo.root, SessionOptions(precision="fp32"))({C.IMAGES: pixels})
    for i, p in enumerate(files):
        np.testing.assert_allclose(np.asarray(rows[str(p)]["cam"]).reshape(direct[C.CAM][i].shape), direct[C.CAM][i],
                                   atol=1e-6)
    assert np.abs(direct[C.CAM] - fp32[C.CAM]).max() > 1e-3  # the int8 file ran, not model.onnx
