"""`gradcam export` on bad input: exit code 2, one line on stderr naming the problem, nothing left behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradcam_engine.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "gradcam export: error: "


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small .keras files: one exportable CNN and the kinds of model export must refuse."""
    import keras

    keras.utils.set_random_seed(7)
    root = tmp_path_factory.mktemp("models")
    L = keras.layers

    def save(name: str, inputs: keras.KerasTensor, outputs: keras.KerasTensor) -> Path:
        path = root / f"{name}.keras"
        keras.Model(inputs, outputs, name=name).save(path)
        return path

    def conv_trunk() -> tuple[keras.KerasTensor, keras.KerasTensor]:
        inputs = keras.Input((16, 16, 3))
        x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inputs)
        return inputs, L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)

    paths = {}
    inputs, x = conv_trunk()
    paths["cnn"] = save("cnn", inputs, L.Dense(3, activation="softmax", name="classes")(
        L.GlobalAveragePooling2D(name="pool")(x)))

    inputs = keras.Input((10,))
    paths["mlp"] = save("mlp", inputs, L.Dense(2, name="out")(L.Dense(8, activation="relu", name="hidden")(inputs)))

    inputs, x = conv_trunk()
    x = L.LayerNormalization(name="head_norm")(L.GlobalAveragePooling2D(name="pool")(x))
    paths["layernorm_head"] = save("layernorm_head", inputs, L.Dense(3, activation="softmax", name="classes")(x))

    inputs, x = conv_trunk()
    x = L.Dense(8, activation="softplus", name="hidden_softplus")(L.GlobalAveragePooling2D(name="pool")(x))
    paths["softplus_head"] = save("softplus_head", inputs, L.Dense(3, activation="softmax", name="classes")(x))

    not_a_model = root / "notes.keras"
    not_a_model.write_text("these are notes, not a model\n")
    paths["text_named_keras"] = not_a_model
    txt = root / "model.txt"
    txt.write_text("cnn\n")
    paths["txt"] = txt
    return paths


def fails_cleanly(capsys: pytest.CaptureFixture[str], parent: Path, *argv: str) -> str:
    """Run `gradcam export ARGV` in-process; check exit 2, one stderr line, no traceback, `parent` untouched."""
    before = sorted(os.listdir(parent))
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), lines[0]
    after = sorted(os.listdir(parent))
    assert after == before, f"export left {sorted(set(after) - set(before))} in {parent}"
    assert not [n for n in after if n.startswith(".")], "a temporary directory was left behind"
    return lines[0][len(PREFIX):]


@pytest.fixture
def out_parent(tmp_path: Path) -> Path:
    parent = tmp_path / "artifacts"
    parent.mkdir()
    return parent


def test_text_file_named_keras_is_refused_as_not_a_keras_model(models, out_parent, capsys) -> None:
    message = fails_cleanly(capsys, out_parent, str(models["text_named_keras"]), "--out", str(out_parent / "a"))
    assert "notes.keras" in message and "not a loadable Keras model" in message
    assert "is a zip archive; this one is not" in message


def test_zip_named_keras_without_a_model_is_refused(out_parent, tmp_path, capsys) -> None:
    import zipfile

    fake = tmp_path / "photos.keras"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    message = fails_cleanly(capsys, out_parent, str(fake), "--out", str(out_parent / "z"))
    assert "photos.keras" in message and "not a loadable Keras model" in message


def test_txt_file_is_refused_as_not_a_keras_model_file(models, out_parent, capsys) -> None:
    message = fails_cleanly(capsys, out_parent, str(models["txt"]), "--out", str(out_parent / "a"))
    assert "model.txt" in message and "not a Keras model file" in message


def test_missing_model_file_is_named(out_parent, capsys, tmp_path) -> None:
    message = fails_cleanly(capsys, out_parent, str(tmp_path / "absent.keras"), "--out", str(out_parent / "a"))
    assert "absent.keras" in message and "no such file" in message


def test_model_without_a_4d_layer_is_refused(models, out_parent, capsys) -> None:
    message = fails_cleanly(capsys, out_parent, str(models["mlp"]), "--out", str(out_parent / "a"))
    assert "no layer with a 4-D output" in message


def test_unknown_layer_is_named_and_candidate_layers_are_listed(models, out_parent, capsys) -> None:
    message = fails_cleanly(capsys, out_parent, str(models["cnn"]), "--out", str(out_parent / "a"),
                            "--layer", "conv9")
    assert "'conv9' not found" in message
    assert "conv1" in message and "conv2" in message


def test_layer_without_a_4d_output_is_refused(models, out_parent, capsys) -> None:
    message = fails_cleanly(capsys, out_parent, str(models["cnn"]), "--out", str(out_parent / "a"),
                            "--layer", "pool")
    assert "'pool'" in message and "4-D" in message


@pytest.mark.parametrize("model, named", [("layernorm_head", ["head_norm", "LayerNormalization"]),
                                          ("softplus_head", ["hidden_softplus", "softplus"])],
                         ids=["layer_normalization", "dense_softplus"])
def test_unsupported_head_op_is_named(models, out_parent, capsys, model, named) -> None:
    message = fails_cleanly(capsys, out_parent, str(models[model]), "--out", str(out_parent / "a"))
    assert "not supported" in message
    for word in named:
        assert word in message


@pytest.mark.parametrize("below", ["artifact", "deeper/artifact"], ids=["child", "grandchild"])
def test_output_below_a_regular_file_is_refused(models, tmp_path, capsys, below) -> None:
    blocker = tmp_path / "occupied"
    blocker.write_text("a file, not a directory\n")
    message = fails_cleanly(capsys, tmp_path, str(models["cnn"]), "--out", str(blocker / below))
    assert "occupied" in message and "not a directory" in message
    assert blocker.read_text() == "a file, not a directory\n"


def test_existing_artifact_is_not_replaced_without_overwrite(models, out_parent, capsys) -> None:
    existing = out_parent / "a"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    message = fails_cleanly(capsys, out_parent, str(models["cnn"]), "--out", str(existing))
    assert "already exists" in message and "--overwrite" in message
    assert (existing / "keep.txt").read_text() == "keep"


def test_wrong_number_of_class_names_is_refused(models, out_parent, capsys, tmp_path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    message = fails_cleanly(capsys, out_parent, str(models["cnn"]), "--out", str(out_parent / "a"),
                            "--classes", str(classes))
    assert "2 class names" in message and "3 classes" in message


def test_command_line_exits_non_zero_without_traceback(models, out_parent) -> None:
    """The real `python -m engine.cli` process, not main() in-process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "gradcam_engine.cli", "export", str(models["softplus_head"]), "--out",
         str(out_parent / "a")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(PREFIX) and "softplus" in last
    assert os.listdir(out_parent) == []


def test_error_while_building_the_graph_is_reported_as_one_line(out_parent) -> None:
    """A head callable that fails while the fused graph is traced: the original error, not a traced stack."""
    import keras

    from gradcam_engine.export import ExportError, ExportOptions, export_artifact

    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))

    def head(fm):
        raise ValueError("this head cannot run")

    with pytest.raises(ExportError) as caught:
        export_artifact((backbone, head), out_parent / "a", ExportOptions(input_size=(16, 16)))
    message = str(caught.value)
    assert "\n" not in message and "in user code" not in message
    assert "ValueError: this head cannot run" in message
    assert os.listdir(out_parent) == []
