"""`gradcam export` for models that need tf_keras or code: tf_keras .keras/.h5 files, `module.py:function` and
`package.module:function`, the missing-custom-class error, and `gradcam run` on the artifacts on both backends.

The model is tests/tf_keras_models.py's stand-in for the seed notebook's TF Model Garden classifier, saved by tf_keras;
every export is compared with the notebook's per-image GradientTape Grad-CAM on the same weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tf_keras  # the `dev` extra installs it: a missing tf-keras fails these tests, never skips them

import tf_keras_models as G
from gradcam_engine.cli.main import main
from gradcam_engine.engine import contract as C

PREFIX = "gradcam export: error: "


@pytest.fixture(scope="module")
def garden() -> G.GardenModel:
    return G.build(seed=4, softmax=True)


@pytest.fixture(scope="module")
def saved(garden: G.GardenModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The classifier saved by tf_keras as .keras and .h5, and the code that loads it: a module file and a package."""
    root = tmp_path_factory.mktemp("garden_files")
    paths = {ext: root / f"garden.{ext}" for ext in ("keras", "h5")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are saving your model as an HDF5 file")  # the legacy format, on purpose
        for path in paths.values():
            garden.model.save(path)
    loader = f"""
        import tf_keras

        def load_pair():
            model = tf_keras.models.load_model({str(paths['h5'])!r}, compile=False)
            return model.get_layer("tiny_resnet"), [model.get_layer(n) for n in ("gap", "drop", "pred")]

        def load_model():
            return tf_keras.models.load_model({str(paths['keras'])!r}, compile=False)
        """
    (root / "build_garden.py").write_text(textwrap.dedent(loader))
    (root / "garden_pkg").mkdir()
    (root / "garden_pkg" / "__init__.py").write_text("")
    (root / "garden_pkg" / "models.py").write_text(textwrap.dedent(loader))
    return {**paths, "root": root, "module": root / "build_garden.py"}


def export(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in out + err, err
    return lines[0][len(PREFIX):]


def manifest_of(root: Path) -> dict:
    return json.loads((root / C.MANIFEST).read_text())


# --- files saved by tf_keras --------------------------------------------------------------------------------------
def test_tf_keras_keras_file_exports_and_matches_the_notebook(saved, garden, tmp_path, capsys) -> None:
    out = tmp_path / "from_keras"
    summary = export(capsys, str(saved["keras"]), "--out", str(out), "--preprocess", G.PREPROCESSING)
    assert "score pre-softmax logit" in summary
    G.assert_parity(out, garden.reference("logit"), garden)
    assert manifest_of(out)["framework"] == "tf_keras"


def test_tf_keras_h5_file_exports_with_score_output_and_matches_the_notebook(saved, garden, tmp_path,
                                                                            capsys) -> None:
    out = tmp_path / "from_h5"
    export(capsys, str(saved["h5"]), "--out", str(out), "--preprocess", G.PREPROCESSING, "--score", "output")
    G.assert_parity(out, garden.reference("output"), garden, batches=(1, 8))
    assert manifest_of(out)["score"] == "softmax probability (model output)"


# --- models built by code -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def from_module_file(saved, tmp_path_factory, garden) -> Path:
    """The README's Model Garden command: `gradcam export path/build_garden.py:load_pair --layer 5 --input-size HxW
    --preprocess caffe --score output`, a (backbone, head) pair with a softmax head, the notebook's score."""
    out = tmp_path_factory.mktemp("module_route") / "artifact"
    assert main(["export", f"{saved['module']}:load_pair", "--layer", "5", "--input-size", "{}x{}".format(*G.SIZE),
                 "--preprocess", G.PREPROCESSING, "--score", "output", "--out", str(out)]) == 0
    return out


def test_module_file_function_route_exports_a_pair_with_score_output(from_module_file, garden) -> None:
    G.assert_parity(from_module_file, garden.reference("output"), garden)
    manifest = manifest_of(from_module_file)
    assert manifest["target_layer"] == "5" and manifest["model_name"] == "tiny_resnet"
    assert manifest["score"] == "softmax probability (model output)"


def test_package_module_function_route_exports_a_model(saved, garden, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(saved["root"])  # package.module resolves from the working directory, as `python -m` does
    out = tmp_path / "from_package"
    export(capsys, "garden_pkg.models:load_model", "--out", str(out), "--preprocess", G.PREPROCESSING,
           "--score", "output")
    G.assert_parity(out, garden.reference("output"), garden, batches=(3,), saved_model=False)
    assert str(saved["root"]) not in sys.path  # the working directory was on the path only while loading


@pytest.mark.parametrize("spec, words", [
    ("missing_file.py:build", ["missing_file.py", "no such file"]),
    ("{module}:no_such_function", ["has no function 'no_such_function'"]),
    ("garden_pkg.absent:build", ["importing garden_pkg.absent failed", "ModuleNotFoundError"]),
], ids=["file", "function", "module"])
def test_builder_route_errors_name_what_is_missing(saved, tmp_path, capsys, monkeypatch, spec, words) -> None:
    monkeypatch.chdir(saved["root"])
    message = refused(capsys, spec.format(module=saved["module"]), "--out", str(tmp_path / "a"))
    for word in words:
        assert word in message
    assert not (tmp_path / "a").exists()


def test_builder_that_fails_or_returns_no_model_is_named(tmp_path, capsys) -> None:
    code = tmp_path / "bad_builders.py"
    code.write_text("def broken():\n    raise RuntimeError('weights not found')\n\n"
                    "def nothing():\n    return [1, 2]\n")
    message = refused(capsys, f"{code}:broken", "--out", str(tmp_path / "a"))
    assert "bad_builders.py:broken failed: RuntimeError: weights not found" in message
    message = refused(capsys, f"{code}:nothing", "--out", str(tmp_path / "a"))
    assert "returned list" in message and "(backbone, head) pair" in message


# --- gradcam run on an artifact from the code route ---------------------------------------------------------------
def test_gradcam_run_gives_the_same_cams_on_onnx_runtime_and_tensorflow(from_module_file, garden, tmp_path) -> None:
    import pyarrow.dataset as ds
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(garden.images):
        Image.fromarray(image).save(folder / f"scene_{i}.png")
    results = {}
    for backend in ("onnx", "tf"):
        run_dir = tmp_path / f"run_{backend}"
        assert main(["run", str(from_module_file), str(folder), "--out", str(run_dir), "--backend", backend]) == 0
        rows = ds.dataset(str(run_dir / "results"), format="parquet").to_table().to_pylist()
        results[backend] = {Path(r["path"]).name: r for r in rows}
    assert len(results["onnx"]) == len(results["tf"]) == G.BATCH
    ref = garden.reference("output", class_index=np.full(G.BATCH, -1, np.int32))
    for i in range(G.BATCH):
        for backend in ("onnx", "tf"):
            row = results[backend][f"scene_{i}.png"]
            cam = np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"])
            assert row["target_class"] == ref[C.TARGET_CLASS][i]
            assert float(np.abs(cam - ref[C.CAM][i]).max()) <= 1e-4


# --- custom classes ---------------------------------------------------------------------------------------------
CUSTOM_LAYERS = """
import tf_keras


@tf_keras.saving.register_keras_serializable(package="Garden")
class Scale(tf_keras.layers.Layer):
    def build(self, shape):
        self.factor = self.add_weight(name="factor", shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.factor
"""

SAVE_CUSTOM = """
import sys
sys.path.insert(0, sys.argv[1])
import tf_keras
import garden_layers

image = tf_keras.Input((16, 16, 3))
x = tf_keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
x = garden_layers.Scale(name="scale")(x)
out = tf_keras.layers.Dense(2, activation="softmax", name="pred")(tf_keras.layers.GlobalAveragePooling2D()(x))
model = tf_keras.Model(image, out)
model.save(sys.argv[1] + "/custom.keras")
model.save(sys.argv[1] + "/custom.h5")
"""


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tf_keras model with a registered custom layer, saved by another process (this one never imported it)."""
    root = tmp_path_factory.mktemp("custom")
    (root / "garden_layers.py").write_text(CUSTOM_LAYERS)
    done = subprocess.run([sys.executable, "-c", SAVE_CUSTOM, str(root)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def _forget_custom_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(tf_keras.saving.get_custom_objects(), "Garden>Scale", raising=False)


def test_missing_custom_class_in_a_keras_file_is_named_with_its_module_and_the_route(custom, tmp_path, capsys,
                                                                                   monkeypatch) -> None:
    _forget_custom_class(monkeypatch)
    message = refused(capsys, str(custom / "custom.keras"), "--out", str(tmp_path / "a"))
    assert "unknown layer 'Garden>Scale' (from module garden_layers)" in message
    assert "--import garden_layers" in message and "your_module.py:build_model" in message


def test_missing_custom_class_in_an_h5_file_is_named_with_the_route(custom, tmp_path, capsys, monkeypatch) -> None:
    _forget_custom_class(monkeypatch)
    message = refused(capsys, str(custom / "custom.h5"), "--out", str(tmp_path / "a"))
    assert "unknown layer 'Garden>Scale'" in message and "your_module.py:build_model" in message


def test_import_flag_makes_a_custom_class_resolve(custom, tmp_path, capsys, monkeypatch) -> None:
    _forget_custom_class(monkeypatch)
    monkeypatch.chdir(custom)
    monkeypatch.delitem(sys.modules, "garden_layers", raising=False)
    out = tmp_path / "custom_artifact"
    export(capsys, str(custom / "custom.keras"), "--import", "garden_layers", "--out", str(out))
    assert manifest_of(out)["target_layer"] == "scale"


def test_import_flag_naming_a_missing_module_is_one_line(tmp_path, capsys) -> None:
    message = refused(capsys, "model.keras", "--import", "no_such_module_here", "--out", str(tmp_path / "a"))
    assert "--import no_such_module_here: ModuleNotFoundError" in message
