"""`gradcam export` options that shape the artifact: --input-size for a model without a fixed size (here not square),
--opset, --classes as a JSON list, --precision fp16 alone; each through the real command line, checked in the files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.cli.main import main
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.session import GradCAMSession, SessionOptions
from engine_support import lively, pearson

HEIGHT, WIDTH = 40, 56
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def free_size_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN that takes images of any size (Input((None, None, 3))): export needs --input-size."""
    import keras

    keras.utils.set_random_seed(12)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    path = tmp_path_factory.mktemp("free_size") / "free_size.keras"
    keras.Model(inputs, out, name="free_size_cnn").save(path)
    return path


def keras_outputs(model_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The per-image reference on the Keras model itself, at the exported size."""
    import keras

    from gradcam_engine.bench.contenders.reference import gradcam_reference, split_for_reference

    model = keras.models.load_model(model_path, compile=False)
    return gradcam_reference(images, np.full(len(images), -1, np.int32), split_for_reference(model, "last", "tf"))


def test_export_from_the_command_line_with_input_size_opset_and_json_classes(
        free_size_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CLASSES))
    out = tmp_path / "artifact"
    code = main(["export", str(free_size_model), "--out", str(out), "--input-size", f"{HEIGHT}x{WIDTH}",
                 "--opset", "15", "--classes", str(classes), "--preprocess", "tf"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert f"exported free_size_cnn -> {out}: layer last (cam 20x28x8)" in printed and "opset 15" in printed, printed

    manifest = json.loads((out / C.MANIFEST).read_text())
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (HEIGHT, WIDTH)
    assert manifest["input"]["shape"] == ["N", HEIGHT, WIDTH, 3]
    assert (manifest["cam"]["height"], manifest["cam"]["width"]) == (HEIGHT // 2, WIDTH // 2)
    assert manifest["class_names"] == CLASSES and manifest["opset"] == 15
    model = onnx.load(str(out / C.ONNX_FILE))
    assert {o.domain: o.version for o in model.opset_import}[""] == 15
    shape = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert shape[1:] == [HEIGHT, WIDTH, 3]

    images = scene_images(6, (HEIGHT, WIDTH), seed=61)
    session = ort.InferenceSession(str(out / C.ONNX_FILE), providers=["CPUExecutionProvider"])
    got = dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS), {
        C.IMAGES: images, C.CLASS_INDEX: np.full(len(images), -1, np.int32)})))
    want = keras_outputs(free_size_model, images)
    assert lively(want[C.CAM]).all()
    np.testing.assert_array_equal(got[C.TARGET_CLASS], want[C.TARGET_CLASS])
    assert np.abs(got[C.CAM] - want[C.CAM]).max() <= 1e-4


def test_a_model_without_a_fixed_size_needs_input_size(free_size_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(free_size_model), "--out", str(tmp_path / "artifact")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input size is not fixed" in err[0] and "--input-size HxW" in err[0]
    assert not (tmp_path / "artifact").exists()


def test_precision_fp16_writes_the_half_precision_files_beside_fp32_and_the_engine_runs_them(
        free_size_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "artifact"
    code = main(["export", str(free_size_model), "--out", str(out), "--input-size", f"{HEIGHT}x{WIDTH}",
                 "--precision", "fp16", "--preprocess", "tf"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "model_fp16.onnx (fp16) vs TensorFlow fp32" in printed
    manifest = json.loads((out / C.MANIFEST).read_text())
    # fp32 is always written: the half-precision files are derived from it and judged against it
    assert manifest["precision"] == {C.ONNX_FILE: "fp32", C.SAVED_MODEL_DIR: "fp32", C.ONNX_FP16_FILE: "fp16",
                                     C.SAVED_MODEL_FP16_DIR: "mixed_float16"}
    assert {p.name for p in out.iterdir()} == {C.MANIFEST, *manifest["precision"]}
    assert {rel.split("/")[0] for rel in manifest["files"]} == set(manifest["precision"])

    session = GradCAMSession(out, SessionOptions(precision="fp16"))
    assert session.precision == "fp16"
    images = scene_images(6, (HEIGHT, WIDTH), seed=62)
    got = session({C.IMAGES: images})
    want = keras_outputs(free_size_model, images)
    same = got[C.TARGET_CLASS] == want[C.TARGET_CLASS]
    assert same.mean() >= 5 / 6 and pearson(got[C.CAM][same], want[C.CAM][same]).min() >= 0.99
