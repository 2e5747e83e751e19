"""End to end: JPEG files on disk -> Parquet results through engine.run.run_gradcam, against model-only.

Model-only runs the same session on the same images, already decoded by the engine's own decoder, at the same batch
size: the ratio is what reading, decoding and writing cost on top of the model. The dataset-size sweep runs each
size in a fresh process (engine only, no TensorFlow), so each peak resident memory is that run's alone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.bench.errors import BenchError
from gradcam_engine.bench.measure.timing import Unit

Array = np.ndarray


def decode_like_engine(paths: list[Path], size: tuple[int, int]) -> Array:
    """uint8 [N, H, W, 3]: the pixels run_gradcam feeds the model for these files."""
    from gradcam_engine.engine.decode import decode_image

    return np.stack([decode_image(Path(p).read_bytes(), size).pixels for p in paths])


def run_config(artifact: Path, list_file: Path, out: Path, batch_size: int, backend: str, device: str,
               precision: str = "auto") -> Any:
    """The RunConfig of one end-to-end repetition (results replaced each time)."""
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions

    return RunConfig(artifact=str(artifact), inputs=[str(list_file)], out=str(out),
                     session=SessionOptions(backend=backend, device=device, precision=precision),
                     batch_size=batch_size, overwrite=True, progress=False)


def e2e_name(kind: str, runtime: str, precision: str) -> str:
    """'end-to-end (JPEG -> Parquet)' for the default runtime in fp32, else with runtime and precision appended."""
    base = {"end-to-end": "end-to-end (JPEG -> Parquet)", "model-only": "model-only (decoded arrays)"}[kind]
    return base if precision == "fp32" and runtime.startswith("onnx") else f"{base} {runtime} {precision}"


def end_to_end_unit(session: Any, config: Any, images: int, runtime: str, precision: str = "fp32") -> Unit:
    """A repetition = one run_gradcam call over the JPEG list, wall time from listing to the last shard."""
    from gradcam_engine.engine.local_run import run_gradcam

    def run() -> list[float]:
        start = time.perf_counter()
        summary = run_gradcam(config, session=session)
        if summary.ok != images:
            raise BenchError(f"end-to-end run wrote {summary.ok} ok rows for {images} images ({summary.errors} "
                             f"errors); see {config.out}/results")
        return [time.perf_counter() - start]
    return Unit(e2e_name("end-to-end", runtime, precision), "end-to-end", runtime, precision, config.batch_size,
                images, run, group="end-to-end", per_batch=False)


def model_only_unit(session: Callable[[dict[str, Array]], dict[str, Array]], pixels: Array, batch_size: int,
                    runtime: str, precision: str = "fp32") -> Unit:
    """The same session on the same decoded images, batch by batch."""
    from gradcam_engine.bench.measure.timing import batched_run

    class_index = np.full(len(pixels), -1, np.int32)
    call = lambda images, ci: session({C.IMAGES: images, C.CLASS_INDEX: ci})  # noqa: E731
    return Unit(e2e_name("model-only", runtime, precision), "model-only", runtime, precision, batch_size,
                len(pixels), batched_run(call, pixels, class_index, batch_size), group="end-to-end")


def parquet_cams(run_dir: Path) -> dict[str, Array]:
    """path -> CAM [h, w] from a run's Parquet results."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(run_dir) / "results", columns=["path", "cam", "cam_height", "cam_width"])
    rows = table.to_pydict()
    return {p: np.asarray(c, np.float32).reshape(h, w)
            for p, c, h, w in zip(rows["path"], rows["cam"], rows["cam_height"], rows["cam_width"])}


def fresh_process_run(artifact: Path, list_file: Path, out: Path, batch_size: int, backend: str, device: str,
                      timeout: float = 3600) -> dict[str, Any]:
    """One end-to-end run in a new Python process; returns its throughput and peak resident memory."""
    from gradcam_engine.bench.measure.fresh import run_worker

    return run_worker("gradcam_engine.bench.measure.e2e_worker",
                      [str(artifact), str(list_file), str(out), "--batch-size", str(batch_size), "--backend", backend,
                       "--device", device], timeout)
