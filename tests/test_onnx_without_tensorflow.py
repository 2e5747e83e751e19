"""Running an ONNX artifact needs neither TensorFlow nor Keras nor tf2onnx: a process where they cannot be imported
runs the engine, as the library and as the command line."""
from __future__ import annotations

import json
from pathlib import Path

from engine_support import SmallArtifact, artifact, run_python, write_scenes  # noqa: F401 (fixture)

BLOCK = r"""
import importlib.abc, json, sys

BLOCKED = {"tensorflow", "keras", "tf2onnx", "tf_keras", "tensorboard"}


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocked())
for name in list(sys.modules):
    assert name.partition(".")[0] not in BLOCKED, name

def report(**values):
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print(json.dumps({"loaded": loaded, "tensorflow_in_sys_modules": "tensorflow" in sys.modules, **values}))
"""

LIBRARY = BLOCK + r"""
try:
    import tensorflow
except ImportError:
    pass
else:
    raise SystemExit("tensorflow was importable")

from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig

artifact, out, *inputs = sys.argv[1:]
summary = run_gradcam(RunConfig(artifact=artifact, inputs=inputs, out=out, progress=False))
print(summary.text())
report(ok=summary.ok, errors=summary.errors)
"""

COMMAND_LINE = BLOCK + r"""
from gradcam_engine.cli.main import main

code = main(sys.argv[1:])
report(code=code)
"""


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_run_gradcam_with_the_onnx_backend_works_where_tensorflow_cannot_be_imported(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    images = write_scenes(tmp_path / "images", [(64, 64), (100, 80), (31, 47), (200, 150)])
    done = run_python(LIBRARY, str(artifact.root), str(tmp_path / "run"), str(tmp_path / "images"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 images: 4 ok, 0 errors" in done.stdout
    assert "img/s" in done.stdout
    result = last_json(done.stdout)
    assert result["tensorflow_in_sys_modules"] is False
    assert result["loaded"] == []
    assert (result["ok"], result["errors"]) == (len(images), 0)
    assert (tmp_path / "run" / "results").is_dir()


def test_the_command_line_runs_an_onnx_artifact_where_tensorflow_cannot_be_imported(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(64, 64), (90, 70)])
    done = run_python(COMMAND_LINE, "run", str(artifact.root), str(tmp_path / "images"), "--out",
                      str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 images: 2 ok, 0 errors" in done.stdout
    result = last_json(done.stdout)
    assert result == {"loaded": [], "tensorflow_in_sys_modules": False, "code": 0}


def test_asking_for_the_tf_backend_without_tensorflow_is_a_one_line_error(artifact: SmallArtifact,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    write_scenes(tmp_path / "images", [(64, 64)])
    done = run_python(COMMAND_LINE, "run", str(artifact.root), str(tmp_path / "images"), "--out",
                      str(tmp_path / "run"), "--backend", "tf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_json(done.stdout)["code"] == 2
    assert done.stderr.strip().splitlines() == [
        "gradcam run: error: --backend tf needs TensorFlow (tensorflow is not installed): "
        "pip install 'gradcam-engine[export]'"]
    assert not (tmp_path / "run").exists()
