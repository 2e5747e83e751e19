"""Shared by the precision tests: the shipped demo model exported once with int8 (and bf16 where TensorFlow can run
bf16 here) through the command line, calibrated on demo scenes written as image files, and held-out scenes to judge
it on. The demo model is trained, so its top-1 classes and CAMs mean something (random weights would not)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model.keras"
CALIBRATION_SEED = 7      # the scenes int8 is calibrated on (and the gate's held-out quarter)
HELD_OUT_SEED = 2026      # the scenes the tests judge on: never seen by calibration
CALIBRATION_SCENES = 200


def tf_can_run_bf16() -> bool:
    """oneDNN runs bf16 natively (avx512_bf16, AMX) or emulates it, bf16-rounded, on any AVX-512 CPU; on older CPUs
    TensorFlow cannot compute bf16 at all."""
    from gradcam_engine.engine.cpu import cpu_flags, native_bf16

    return native_bf16() or "avx512f" in cpu_flags()


@dataclass(frozen=True)
class DemoPrecisions:
    """The exported artifact, the scene files it was calibrated on, and what `gradcam export` printed."""

    root: Path
    scenes: Path
    printed: str

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / "manifest.json").read_text())


_CACHE: dict[str, DemoPrecisions] = {}


def demo_precisions(factory: pytest.TempPathFactory) -> DemoPrecisions:
    """`gradcam export demo/model.keras --precision fp32,int8[,bf16] --calibrate SCENES`, once per test process."""
    if "demo" not in _CACHE:
        import contextlib
        import io

        from gradcam_engine.cli.main import main
        from gradcam_engine.demo.scenes import CLASS_NAMES, write_scene_files

        tmp = factory.mktemp("precisions")
        scenes = tmp / "scenes"
        write_scene_files(scenes, CALIBRATION_SCENES, CALIBRATION_SEED)
        classes = tmp / "classes.json"
        classes.write_text(json.dumps(CLASS_NAMES))
        precision = "fp32,int8,bf16" if tf_can_run_bf16() else "fp32,int8"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["export", str(DEMO_MODEL), "--out", str(tmp / "artifact"), "--classes", str(classes),
                         "--precision", precision, "--calibrate", str(scenes)])
        assert code == 0, out.getvalue()
        _CACHE["demo"] = DemoPrecisions(tmp / "artifact", scenes, out.getvalue())
    return _CACHE["demo"]


def held_out_scenes(n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, boxes) of demo scenes no calibration has seen."""
    from gradcam_engine.demo.scenes import make_scenes

    return make_scenes(n, HELD_OUT_SEED)


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of two CAM batches, written out here rather than taken from export.parity."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def run_onnx(path: Path, images: np.ndarray, class_index: np.ndarray | None = None,
             outputs: tuple[str, ...] = ("predictions", "target_class", "cam")) -> dict[str, np.ndarray]:
    """A graph file's outputs, straight from ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ci = np.full(len(images), -1, np.int32) if class_index is None else class_index.astype(np.int32)
    return dict(zip(outputs, session.run(list(outputs), {"images": images, "class_index": ci})))
