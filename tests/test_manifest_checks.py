"""manifest.json is checked before any image is read: against what a run needs from it, against the graph it
describes (input size, classes, output shapes, the names the graph records), and its checksum list must cover every
file the chosen backend loads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from gradcam_engine.cli.main import main
from engine_support import INPUT_SIZE, SmallArtifact, artifact, copy_artifact, write_scenes  # noqa: F401
from rundir_support import one_line


def _cam_output(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(o for o in manifest["outputs"] if o["name"] == "cam")


# edit of the manifest -> what the one-line error names
EDITS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "class names edited": (lambda m: m.update(class_names=["cat", "dog", "fish"]), '"class_names" is ["cat", "dog"'),
    "num_classes 4 on a 3-class graph": (lambda m: m.update(num_classes=4, class_names=[*m["class_names"], "x"]),
                                         '"num_classes" is 4 but'),
    "input size edited": (lambda m: m["input"].update(height=80), f"the input size is 80x{INPUT_SIZE[1]} but"),
    "no input": (lambda m: m.pop("input"), '"input" is missing'),
    "a CAM method added": (lambda m: m.update(methods=[*m["methods"], "layercam"]), '"methods" is 2 methods but'),
    "an output shape edited": (lambda m: _cam_output(m)["shape"].__setitem__(1, 9), "the shape of output cam is"),
    "checksums emptied": (lambda m: m.update(files={}), '"files" lists no checksums'),
    "model file left out of the checksums": (lambda m: m["files"].pop("model.onnx"),
                                             "model.onnx: not covered by the checksums"),
}


def _edited(art: SmallArtifact, tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    copy = copy_artifact(art, tmp_path / "artifact")
    manifest = json.loads((copy.root / "manifest.json").read_text())
    edit(manifest)
    (copy.root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy.root


@pytest.mark.parametrize("case", list(EDITS))
def test_a_manifest_that_does_not_describe_its_graph_is_refused_before_any_image_is_read(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:  # noqa: F811
    edit, named = EDITS[case]
    root = _edited(artifact, tmp_path, edit)
    write_scenes(tmp_path / "images", [(40, 30), (30, 40)])
    capsys.readouterr()
    code = main(["run", str(root), str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--target", "2"])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert named in line and "re-export the artifact" in line
    assert not (tmp_path / "run").exists()


TF_EDITS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "a SavedModel file left out of the checksums": (lambda m: m["files"].pop("saved_model/saved_model.pb"),
                                                    "saved_model.pb: not covered by the checksums"),
    "num_classes 4 on a 3-class graph": (lambda m: m.update(num_classes=4, class_names=[*m["class_names"], "x"]),
                                         '"num_classes" is 4 but'),
}


@pytest.mark.parametrize("case", list(TF_EDITS))
def test_the_savedmodel_is_held_to_its_manifest_too(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str], case: str) -> None:
    edit, named = TF_EDITS[case]
    root = _edited(artifact, tmp_path, edit)
    write_scenes(tmp_path / "images", [(40, 30)])
    capsys.readouterr()
    code = main(["run", str(root), str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--backend", "tf"])
    assert code == 2
    assert named in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
