"""`run_gradcam`: an artifact and image inputs -> a run directory with Parquet results, overlays and run.json.

One path for the data: list -> read/decode (threads) -> batch -> runner -> writer (shards, overlays).
Resumable: rows already committed in results/ are skipped; the options that shape results are fingerprinted in
run.json and a mismatch is refused unless `overwrite`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engine import contract as C
from engine.artifact import load_artifact
from engine.decode import DEFAULT_MAX_PIXELS
from engine.errors import RunError
from engine.inputs import InputListing, list_inputs
from engine.overlay import overlays
from engine.pipeline import BackgroundWriter, Batch, batches, load, ordered_map, prefetch
from engine.progress import Progress
from engine.results import (RESULTS_DIR, clean_partial, concat, count_rows, done_paths, error_row, ok_rows,
                            to_table, write_shard)
from engine.runner import GradCAMRunner, RunnerOptions

RUN_JSON = "run.json"
OVERLAY_DIR = "overlays"


@dataclass(frozen=True)
class RunConfig:
    """Everything `gradcam run` accepts."""

    artifact: str
    inputs: Sequence[str]
    out: str
    backend: str = "onnx"
    device: str = "auto"
    batch_size: int = 32
    target: str = "predicted"        # predicted | class index | class name
    overlays: str = "none"           # none | all | N (the first N images)
    workers: int = 0                 # decode threads; 0 = one per core
    shard_size: int = 4096           # rows per Parquet shard (also the resume granularity)
    overwrite: bool = False
    max_bytes: int = 256 << 20       # larger files are refused before reading
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0                 # runtime intra-op threads; 0 = runtime default
    precision: str = "auto"          # auto (fp16 on CUDA when exported) | fp32 | fp16
    io_binding: bool | None = None   # None: on for CUDA
    fixed_batch: bool = False        # pad the last batch to batch_size (stable shapes; needed by cuda_graph)
    cuda_graph: bool = False
    trt: bool = False
    progress: bool | None = None     # None: on a terminal only


@dataclass
class RunSummary:
    """What a run did; also written into run.json."""

    out: str
    images: int
    ok: int
    errors: int
    processed: int
    skipped_resume: int
    skipped_non_image: int
    seconds: float
    images_per_second: float
    device: str
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        resumed = f" ({self.skipped_resume} already done, resumed)" if self.skipped_resume else ""
        return (f"{self.images} images: {self.ok} ok, {self.errors} errors; processed {self.processed} in "
                f"{self.seconds:.1f} s ({self.images_per_second:.1f} img/s, {self.backend} on {self.device})"
                f"{resumed}. Results: {Path(self.out) / RESULTS_DIR}/ (Parquet), summary {Path(self.out) / RUN_JSON}"
                + (f", overlays {Path(self.out) / OVERLAY_DIR}/" if self.extra.get("overlays") else "") + ".")


def runner_options(config: RunConfig, **overrides: Any) -> RunnerOptions:
    """The runner options a run implies (the Ray runner overrides device and threads per replica)."""
    options = dict(backend=config.backend, device=config.device, threads=config.threads, precision=config.precision,
                   io_binding=config.io_binding, fixed_batch=config.batch_size if config.fixed_batch else 0,
                   cuda_graph=config.cuda_graph, trt=config.trt,
                   trt_cache=str(Path(config.out).resolve() / "trt_cache") if config.trt else None)
    return RunnerOptions(**{**options, **overrides})


def resolve_target(target: str, class_names: list[str]) -> int:
    """--target -> the class_index fed to the graph (-1 for the predicted class)."""
    if target == "predicted":
        return -1
    if target.lstrip("-").isdigit():
        index = int(target)
        if not 0 <= index < len(class_names):
            raise RunError(f"--target {target}: class index out of range 0..{len(class_names) - 1}")
        return index
    if target in class_names:
        return class_names.index(target)
    raise RunError(f"--target {target!r}: not 'predicted', an index, or a class name ({', '.join(class_names[:20])})")


def parse_overlays(spec: str) -> int:
    if spec == "none":
        return 0
    if spec == "all":
        return 1 << 62
    if spec.isdigit():
        return int(spec)
    raise RunError(f"--overlays {spec!r}: use none, all or a number")


def run_fingerprint(config: RunConfig, artifact_sum: str, class_index: int, precision: str) -> dict[str, Any]:
    """The options that decide what a row contains; a resumed run must match them."""
    return {"artifact_sha256": artifact_sum, "inputs": [str(s) for s in config.inputs], "backend": config.backend,
            "precision": precision, "class_index": class_index, "overlays": config.overlays}


def library_versions() -> dict[str, str]:
    import onnxruntime
    import PIL
    import pyarrow

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "pyarrow": pyarrow.__version__, "pillow": PIL.__version__}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    run_json = out / RUN_JSON
    if out.exists() and overwrite:
        for name in (RESULTS_DIR, OVERLAY_DIR, RUN_JSON):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    elif run_json.is_file():
        previous = json.loads(run_json.read_text()).get("fingerprint")
        if previous != fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(previous or {})
                             if (previous or {}).get(k) != fingerprint.get(k))
            raise RunError(f"{out}: holds a run with different {', '.join(changed)}; use another --out, or "
                           "--overwrite to replace it")
    elif out.exists() and (out / RESULTS_DIR).exists():
        raise RunError(f"{out}: has results but no {RUN_JSON}; use another --out or --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create the run directory ({e.strerror})") from None


def run_gradcam(config: RunConfig, runner: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
                ) -> RunSummary:
    """Stream every input through the artifact's graph and write one result row per input."""
    if config.batch_size < 1:
        raise RunError("--batch-size must be at least 1")
    overlay_limit = parse_overlays(config.overlays)
    listing = list_inputs(config.inputs)  # raises InputError for a missing path, before anything is written
    if runner is None:
        runner = GradCAMRunner(config.artifact, runner_options(config))
    artifact = getattr(runner, "artifact", None) or load_artifact(config.artifact, verify=[])
    labels = artifact.class_names
    class_index = resolve_target(config.target, labels)
    out = Path(config.out)
    precision = getattr(runner, "precision", "fp32")
    fingerprint = run_fingerprint(config, artifact.checksum, class_index, precision)
    prepare_run_dir(out, fingerprint, config.overwrite)
    results_dir = out / RESULTS_DIR
    clean_partial(results_dir)
    done = done_paths(results_dir)
    order = {item.key: i for i, item in enumerate(listing.items)}
    pending = [item for item in listing.items if item.key not in done]
    device = getattr(runner, "device", "cpu")
    run_info: dict[str, Any] = {
        "status": "running", "fingerprint": fingerprint, "artifact": str(config.artifact),
        "options": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(config).items()},
        "device": device, "precision": precision, "versions": library_versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / RUN_JSON, run_info)

    overlay_keys = {item.key for item in listing.items[:overlay_limit]} if overlay_limit else set()
    size = artifact.input_size
    workers = config.workers or max(1, os.cpu_count() or 1)
    in_flight = max(2 * config.batch_size, 4 * workers)
    loaded = ordered_map(lambda item: load(item, size, config.max_bytes, config.max_pixels,
                                           item.key in overlay_keys), pending, workers, in_flight)
    shard: list[dict[str, list[Any]]] = []
    shard_rows = 0
    progress = Progress(len(pending), enabled=config.progress)

    def flush() -> None:
        nonlocal shard, shard_rows
        if shard:
            columns = concat(shard)
            idx = [order[p] for p in columns["path"]]
            write_shard(results_dir, to_table(columns), min(idx), max(idx))
        shard, shard_rows = [], 0

    def write(job: object) -> None:
        nonlocal shard_rows
        batch, outputs = job  # type: ignore[misc]
        columns = batch_rows(batch, outputs, labels)
        write_overlays(out / OVERLAY_DIR, batch, outputs, order)
        shard.append(columns)
        shard_rows += len(columns["path"])
        if shard_rows >= config.shard_size:
            flush()

    def stage(batch: Batch) -> tuple[Batch, Any]:
        """Stack a batch's images and hand them to the runner's staging step (runs in the prefetch thread)."""
        good = [x for x in batch.loaded if x.image is not None]
        if not good:
            return batch, None
        feed = {C.IMAGES: np.stack([x.image.pixels for x in good]),
                C.CLASS_INDEX: np.full(len(good), class_index, np.int32)}
        return batch, (runner.prepare(feed) if hasattr(runner, "prepare") else feed)

    start = time.perf_counter()
    writer = BackgroundWriter(write)
    try:
        for batch, staged in prefetch(map(stage, batches(loaded, config.batch_size))):
            outputs = None
            if staged is not None:
                outputs = runner.run_prepared(staged) if hasattr(runner, "run_prepared") else runner(staged)
            writer.put((batch, outputs))
            progress.update(len(batch.loaded))
    finally:
        writer.close()
        progress.close()
    flush()
    seconds = time.perf_counter() - start
    return finish_run(out, run_info, listing, len(pending), seconds, device, f"{config.backend} {precision}",
                      {"overlays": bool(overlay_keys)})


def finish_run(out: Path, run_info: dict[str, Any], listing: InputListing, processed: int, seconds: float,
               device: str, backend: str, extra: dict[str, Any]) -> RunSummary:
    """Count what results/ now holds, mark run.json complete with counts and throughput, and return the summary.

    Counts come from the results themselves, not this run's tally, so a resumed run reports the whole run.
    """
    counts = count_rows(out / RESULTS_DIR)
    summary = RunSummary(
        out=str(out), images=len(listing.items), ok=counts.get("ok", 0), errors=counts.get("error", 0),
        processed=processed, skipped_resume=len(listing.items) - processed,
        skipped_non_image=listing.skipped_non_image, seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 else 0.0, device=device, backend=backend, extra=extra)
    run_info.update(status="complete", counts={"inputs": summary.images, "ok": summary.ok, "error": summary.errors,
                                               "skipped_non_image": summary.skipped_non_image,
                                               "processed_this_run": summary.processed,
                                               "already_done": summary.skipped_resume},
                    throughput={"seconds": round(seconds, 3), "images_per_second": round(summary.images_per_second, 2)},
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(out / RUN_JSON, run_info)
    return summary


def batch_rows(batch: Batch, outputs: dict[str, np.ndarray] | None, labels: list[str]) -> dict[str, list[Any]]:
    """Rows in input order: ok rows from the outputs, error rows where decoding failed."""
    parts: list[dict[str, list[Any]]] = []
    good = [x for x in batch.loaded if x.image is not None]
    ok_columns = ok_rows([x.key for x in good], [(x.image.width, x.image.height) for x in good], outputs,
                         labels) if good and outputs is not None else None
    position = 0
    for x in batch.loaded:
        if x.image is None:
            parts.append(error_row(x.key, f"{x.key}: {x.error}"))
        else:
            parts.append({k: v[position:position + 1] for k, v in ok_columns.items()})  # type: ignore[union-attr]
            position += 1
    return concat(parts)


def write_overlays(folder: Path, batch: Batch, outputs: dict[str, np.ndarray] | None,
                    order: dict[str, int]) -> None:
    from PIL import Image

    good = [(i, x) for i, x in enumerate(x for x in batch.loaded if x.image is not None)]
    chosen = [(i, x) for i, x in good if x.image.original is not None]
    if not chosen or outputs is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    cams = outputs[C.CAM][[i for i, _ in chosen]]
    for (_, x), overlay in zip(chosen, overlays([x.image.original for _, x in chosen], cams)):
        stem = Path(x.key.split("::")[-1]).stem[:80]
        target = folder / f"{order[x.key]:09d}_{stem}.jpg"
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(overlay).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, target)
