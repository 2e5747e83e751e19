"""The model under test: the seed-shaped ResNet50, a .keras file or an artifact directory, exported once and cached.

The cache key hashes everything that decides the exported bytes (model, options, export's own source, library
versions), so a rerun reuses the export (about a minute for ResNet50) and a change anywhere re-exports. The Keras
model is saved beside the artifact: weights=None initialises randomly, and the in-process contenders (reference,
forward-only) must use exactly the weights that were exported.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcam_engine.engine import contract as C
from gradcam_engine.bench.errors import BenchError

SEED_RESNET50 = "seed-resnet50"
SEED_INPUT_SIZE = (224, 224)
SEED_CLASS_NAMES = ("cat", "dog")
KERAS_FILE = "model.keras"
ARTIFACT_DIR = "artifact"
FORWARD_ONNX = "forward.onnx"
FORWARD_INT8_ONNX = "forward_int8.onnx"
CALIBRATION_IMAGES = 64   # int8 calibrates on 48 of them; the precision gate judges on the other 16


@dataclass(frozen=True)
class BenchModel:
    """An exported artifact, with the Keras model it came from when the bench has it."""

    name: str
    artifact: Path
    keras_path: Path | None      # None for a bare artifact directory: no reference, no forward-only contenders
    cache: Path                  # where derived files (the forward-only ONNX) are kept
    export_seconds: float        # 0.0 when the export came from the cache
    preprocessing: str


def default_work_dir() -> Path:
    """~/.cache/gradcam-engine/bench (XDG_CACHE_HOME respected): exports survive between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradcam-engine" / "bench"


def build_seed_resnet50(input_size: tuple[int, int] = SEED_INPUT_SIZE, seed: int = 0) -> Any:
    """The seed's model shape: ResNet50 (weights=None) + GlobalAveragePooling2D + Dropout + Dense(2) logits."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(*input_size, 3))
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(base.output)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    out = keras.layers.Dense(len(SEED_CLASS_NAMES), name="dense")(x)
    return keras.Model(base.input, out, name="seed_resnet50")


def _source_digest() -> str:
    """sha256 over export/'s sources and the contract: an export made by older code is not reused."""
    from gradcam_engine import export

    digest = hashlib.sha256()
    root = Path(export.__file__).parent
    for path in sorted(root.glob("*.py")) + [Path(C.__file__)]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    from gradcam_engine.engine.artifact import sha256_file

    return sha256_file(path)


def cache_key(spec: str, preprocessing: str, precision: str, seed: int, calibrate: str | None = None) -> str:
    """Short hex key of what decides an export's bytes."""
    import keras
    import tensorflow as tf
    import tf2onnx

    parts = {"spec": spec if spec == SEED_RESNET50 else _file_digest(Path(spec)), "preprocessing": preprocessing,
             "precision": precision, "seed": seed, "input": SEED_INPUT_SIZE if spec == SEED_RESNET50 else None,
             "calibrate": calibrate,
             "export": _source_digest(), "tf": tf.__version__, "keras": keras.__version__,
             "tf2onnx": tf2onnx.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _export_cached(keras_path: Path, folder: Path, preprocessing: str, precision: str,
                   class_names: tuple[str, ...] | None, calibrate: str | None = None,
                   methods: tuple[str, ...] = (C.DEFAULT_METHOD,)) -> float:
    """Export into folder/artifact unless a complete one is there; returns the seconds spent exporting. With
    calibration images, reduced-precision files are written whatever the gate says (keep_failing): the bench
    measures their speed, and reports the gate's figures beside it."""
    from gradcam_engine.export import ExportOptions, export_artifact

    artifact = folder / ARTIFACT_DIR
    if (artifact / C.MANIFEST).is_file():
        return 0.0
    start = time.perf_counter()
    export_artifact(str(keras_path), artifact, ExportOptions(
        preprocessing=preprocessing, precision=precision, class_names=class_names, overwrite=True, methods=methods,
        calibrate=[calibrate] if calibrate else None, calibration_images=CALIBRATION_IMAGES, keep_failing=True))
    return time.perf_counter() - start


def methods_artifact(model: BenchModel, methods: tuple[str, ...]) -> tuple[Path, float]:
    """The bench model exported again with these CAM methods, cached beside its plain export; (artifact, seconds
    spent exporting, 0.0 from the cache)."""
    if model.keras_path is None:
        raise BenchError("an artifact directory cannot be re-exported with other CAM methods; pass --model FILE.keras")
    folder = model.cache / f"methods-{'-'.join(methods)}"
    names = tuple(json.loads((model.artifact / C.MANIFEST).read_text()).get("class_names") or ()) or None
    seconds = _export_cached(model.keras_path, folder, model.preprocessing, "fp32", names, methods=methods)
    return folder / ARTIFACT_DIR, seconds


def prepare_model(spec: str, work_dir: Path, preprocessing: str = "none", precision: str = "fp32",
                  seed: int = 0, calibrate: str | None = None) -> BenchModel:
    """`seed-resnet50`, a .keras file or an artifact directory -> an exported artifact (cached) and its Keras model;
    `calibrate` (a path list of images) is what int8 is calibrated and every reduced precision judged on."""
    work_dir = Path(work_dir)
    if spec == SEED_RESNET50:
        folder = work_dir / f"{SEED_RESNET50}-{cache_key(spec, 'caffe', precision, seed, calibrate)}"
        folder.mkdir(parents=True, exist_ok=True)
        keras_path = folder / KERAS_FILE
        if not keras_path.is_file() or not (folder / ARTIFACT_DIR / C.MANIFEST).is_file():
            tmp = folder / f".{KERAS_FILE}.tmp.keras"
            build_seed_resnet50(SEED_INPUT_SIZE, seed).save(tmp)
            os.replace(tmp, keras_path)
        seconds = _export_cached(keras_path, folder, "caffe", precision, SEED_CLASS_NAMES, calibrate)
        return BenchModel(SEED_RESNET50, folder / ARTIFACT_DIR, keras_path, folder, seconds, "caffe")
    path = Path(spec)
    if path.is_dir():
        if not (path / C.MANIFEST).is_file():
            raise BenchError(f"{path}: not an artifact directory (no {C.MANIFEST}); pass a .keras file, an "
                             f"artifact made by `gradcam export`, or {SEED_RESNET50}")
        manifest = json.loads((path / C.MANIFEST).read_text())
        folder = work_dir / f"artifact-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
        folder.mkdir(parents=True, exist_ok=True)
        return BenchModel(manifest.get("model_name", path.name), path, None, folder, 0.0,
                          manifest["input"]["preprocessing"])
    if path.suffix != ".keras" or not path.is_file():
        raise BenchError(f"--model {spec}: not {SEED_RESNET50}, an artifact directory or an existing .keras file")
    folder = work_dir / f"{path.stem}-{cache_key(str(path), preprocessing, precision, seed, calibrate)}"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = _export_cached(path, folder, preprocessing, precision, None, calibrate)
    return BenchModel(path.stem, folder / ARTIFACT_DIR, path, folder, seconds, preprocessing)
