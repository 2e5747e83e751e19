"""Shared by the run tests: a small exported artifact, images written at test time, and readers for a run's results.

The artifact is a seeded two-convolution CNN exported once per test process; each test module reaches it through its
own module-scoped `artifact` fixture (import it from here), and a test that alters an artifact works on a copy.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = (64, 96)          # (height, width) of the model's input: not square, so a swap of the two shows
CLASS_NAMES = ["cat", "dog", "bird"]
TARGET_LAYER = "last_conv"


@dataclass(frozen=True)
class SmallArtifact:
    """An exported artifact directory and what the tests need to know about it."""

    root: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.manifest["input"]["height"]), int(self.manifest["input"]["width"])

    @property
    def cam_shape(self) -> tuple[int, int]:
        return int(self.manifest["cam"]["height"]), int(self.manifest["cam"]["width"])


def tiny_cnn_file(path: Path, pooling: str, seed: int) -> Path:
    """A seeded 32x32 Conv2D -> MaxPool -> Conv2D("last_conv") -> `pooling` ("gap" or "flatten") -> Dense(3, softmax)
    classifier, saved as a .keras file for the commands that take one (the benchmarks)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = {"gap": keras.layers.GlobalAveragePooling2D, "flatten": keras.layers.Flatten}[pooling]()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name=f"tiny_{pooling}").save(path)
    return path


_EXPORTED: dict[str, SmallArtifact] = {}


def export_small_cnn(out: Path, size: tuple[int, int] = INPUT_SIZE, precision: str = "fp32") -> SmallArtifact:
    """A seeded Conv2D -> Conv2D("last_conv") -> GAP -> Dense(3, softmax) classifier, exported to `out`.

    It predicts all three classes on the test scenes (a model stuck on one class would hide a wrong predicted class
    or label), with a softmax made decisive by a larger kernel: top-1 margins stay far above runtime rounding."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(9)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name=TARGET_LAYER)(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out_layer = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, out_layer, name="small_run_cnn")
    classes = model.get_layer("classes")
    kernel, bias = classes.get_weights()
    classes.set_weights([kernel * 30, bias])
    manifest = export_artifact(model, out, ExportOptions(layer=TARGET_LAYER, preprocessing="tf",
                                                         class_names=CLASS_NAMES, precision=precision))
    return SmallArtifact(out, manifest)


def shared_artifact(factory: pytest.TempPathFactory) -> SmallArtifact:
    """The process' one exported small CNN (exporting takes seconds; tests never modify it in place)."""
    if "small" not in _EXPORTED:
        _EXPORTED["small"] = export_small_cnn(factory.mktemp("run_artifact") / "small_cnn")
    return _EXPORTED["small"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> SmallArtifact:
    return shared_artifact(tmp_path_factory)


def copy_artifact(art: SmallArtifact, dest: Path) -> SmallArtifact:
    shutil.copytree(art.root, dest)
    return SmallArtifact(dest, json.loads((dest / "manifest.json").read_text()))


# --- liveliness of CAMs ----------------------------------------------------------------------------------------------

# What separates a real heatmap from a degenerate one: the contract normalises every map to a peak of 1, so an all-zero
# map fails on its peak and a flat (or nearly flat) map on its contrast: std 0 and peak/mean 1. The bars sit well below
# what the test models give on their scenes (std about 0.1 and peak/mean about 1.5 at the lowest, from 2x2 to 24x16
# maps), so they hold on every fixture.
MIN_CAM_STD = 0.05
MIN_PEAK_TO_MEAN = 1.3


def lively(cams: np.ndarray) -> np.ndarray:
    """Per map [N, h, w]: whether it is a real heatmap (peak 1, spatial contrast a flat map cannot have)."""
    flat = np.asarray(cams, np.float64).reshape(len(cams), -1)
    peak = flat.max(axis=1)
    return ((np.abs(peak - 1.0) <= 1e-5) & (flat.std(axis=1) >= MIN_CAM_STD)
            & (peak >= MIN_PEAK_TO_MEAN * flat.mean(axis=1)))


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of two CAM batches, written out here rather than taken from export/parity.py."""
    x = np.asarray(a, np.float64).reshape(len(a), -1)
    y = np.asarray(b, np.float64).reshape(len(b), -1)
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


# --- images ---------------------------------------------------------------------------------------------------------

def scene(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 RGB [height, width, 3]: a tilted colour gradient with a disc and a box, so CAMs have structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / width + yy / height) / 2
    img = rng.uniform(30, 220, 3) + rng.uniform(-60, 60, 3) * ramp[..., None]
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.15, 0.35) * min(width, height)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    by, bx = rng.uniform(0, height), rng.uniform(0, width)
    img[(np.abs(yy - by) < r * 0.6) & (np.abs(xx - bx) < r)] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def encode(image: Any, fmt: str, **options: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_image(path: Path, pixels: np.ndarray, **options: Any) -> Path:
    """Save RGB pixels; the format follows the extension."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def write_scenes(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """One image per (width, height), alternating JPEG and PNG, named so that directory order is list order."""
    paths = []
    for i, (w, h) in enumerate(sizes):
        ext = "jpg" if i % 2 == 0 else "png"
        paths.append(write_image(folder / f"img_{i:04d}.{ext}", scene(w, h, seed + i)))
    return paths


# --- results --------------------------------------------------------------------------------------------------------

def results_table(run_dir: Path) -> Any:
    """Every committed row of a run, read as one Parquet dataset."""
    import pyarrow.dataset as ds

    return ds.dataset(str(Path(run_dir) / "results"), format="parquet").to_table()


def rows_by_path(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows keyed by input path; fails if any path has more than one row."""
    rows = results_table(run_dir).to_pylist()
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "an input has more than one result row"
    return by_path


def cam_of(row: dict[str, Any]) -> np.ndarray:
    return np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"])


# --- child processes ------------------------------------------------------------------------------------------------

def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(extra)
    return env


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root; sys.argv[1:] are `args`."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


# A child that runs one ONNX run and reports its peak resident memory (kB) and summary as JSON on the last line.
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent (here a pytest process holding
# TensorFlow), so it would report the parent's size rather than the run's.
MEASURED_RUN = r"""
import json, sys
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions

artifact, out, *inputs = sys.argv[1:]
summary = run_gradcam(RunConfig(artifact=artifact, inputs=inputs, out=out,
                                session=SessionOptions(backend="onnx", device="cpu"), progress=False))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
print(json.dumps({"vmhwm_kb": int(status["VmHWM"].split()[0]), "images": summary.images, "ok": summary.ok,
                  "errors": summary.errors}))
"""


def kill_at_first_shard(command: list[str], shards: Path, timeout: float = 60) -> None:
    """Start a `gradcam` command and SIGKILL it as soon as its first shard appears in `shards`: a kill mid-way,
    with some work committed and the rest not."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "gradcam_engine.cli", *command], cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not list(shards.glob("part-*.parquet")):
            assert process.poll() is None, "it ended before a shard appeared: " + process.stderr.read().decode()
            assert time.monotonic() < deadline, f"no shard appeared within {timeout:.0f} s"
            time.sleep(0.002)
        assert process.poll() is None, "it finished before it could be killed; it needs more or slower work"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def measured_run(artifact_root: Path, out: Path, inputs: list[str], timeout: float = 120) -> dict[str, Any]:
    done = run_python(MEASURED_RUN, str(artifact_root), str(out), *inputs, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- several CAM methods --------------------------------------------------------------------------------------------

def add_method(run_dir: Path, name: str) -> None:
    """What a run with a second CAM method looks like: a `cam_<name>` column (here the map flipped left-right) and
    the methods listed in run.json in output order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in sorted((run_dir / "results").glob("part-*.parquet")):
        table = pq.read_table(shard)
        flipped = []
        for row in table.select(["cam", "cam_height", "cam_width"]).to_pylist():
            cam = None if row["cam"] is None else np.asarray(row["cam"], np.float32).reshape(
                row["cam_height"], row["cam_width"])[:, ::-1].ravel().tolist()
            flipped.append(cam)
        pq.write_table(table.append_column(f"cam_{name}", pa.array(flipped, pa.list_(pa.float32()))), shard)
    info = json.loads((run_dir / "run.json").read_text())
    info["methods"] = ["gradcam", name]
    (run_dir / "run.json").write_text(json.dumps(info))
