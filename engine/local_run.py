"""`run_gradcam`: the local run loop, an artifact and image inputs -> a run directory in this process.

One path for the data: list -> read/decode (threads) -> batch -> session -> writer (shards, overlays).
Resumable: rows already committed in results/ are skipped (engine.rundir).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import load_artifact
from gradcam_engine.engine.inputs import list_inputs
from gradcam_engine.engine.overlay import write_overlays
from gradcam_engine.engine.pipeline import BackgroundWriter, LoadedBatch, batches, load, ordered_map, prefetch
from gradcam_engine.engine.progress import Progress
from gradcam_engine.engine.results import batch_rows, concat, results_schema, to_table, write_shard
from gradcam_engine.engine.run_config import RunConfig, parse_overlays, resolve_overlay_method, resolve_target
from gradcam_engine.engine.rundir import RunDirectory, RunSummary, fingerprint
from gradcam_engine.engine.session import GradCAMSession, Prepared, Session


def run_gradcam(config: RunConfig, session: Session | None = None) -> RunSummary:
    """Stream every input through the artifact's graph and write one result row per input."""
    config.check()
    overlay_limit = parse_overlays(config.overlays)
    listing = list_inputs(config.inputs)  # raises InputError for a missing path, before anything is written
    if session is None:
        session = GradCAMSession(load_artifact(config.artifact, verify=[]), config.session_options())
    artifact = session.artifact
    labels = artifact.class_names
    class_index = resolve_target(config.target, labels)
    methods = artifact.methods
    overlay_index = resolve_overlay_method(config.overlay_method, methods)
    schema = results_schema(methods)
    run_dir = RunDirectory(config.out)
    precision = session.precision
    run_fingerprint = fingerprint(config, artifact.checksum, class_index, precision)
    run_dir.prepare(run_fingerprint, config.overwrite)
    pending = run_dir.pending(listing)
    order = {item.key: i for i, item in enumerate(listing.items)}
    run_dir.start(config, run_fingerprint, session.device, precision, methods=list(methods))

    overlay_keys = {item.key for item in listing.items[:overlay_limit]} if overlay_limit else set()
    size = artifact.input_size
    workers = config.workers or max(1, os.cpu_count() or 1)
    in_flight = max(2 * config.batch_size, 4 * workers)
    loaded = ordered_map(lambda item: load(item, size, config.max_bytes, config.max_pixels,
                                           item.key in overlay_keys), [item for _, item in pending], workers,
                         in_flight)
    shard: list[dict[str, list[Any]]] = []
    shard_rows = 0
    progress = Progress(len(pending), enabled=config.progress)

    def flush() -> None:
        nonlocal shard, shard_rows
        if shard:
            columns = concat(shard)
            idx = [order[p] for p in columns["path"]]
            write_shard(run_dir.results, to_table(columns, schema), min(idx), max(idx))
        shard, shard_rows = [], 0

    def write(job: tuple[LoadedBatch, dict[str, np.ndarray] | None]) -> None:
        nonlocal shard_rows
        batch, outputs = job
        columns = batch_rows(batch, outputs, labels, methods)
        write_overlays(run_dir.overlays, batch, outputs, order, overlay_index)
        shard.append(columns)
        shard_rows += len(columns["path"])
        if shard_rows >= config.shard_size:
            flush()

    def stage(batch: LoadedBatch) -> tuple[LoadedBatch, Prepared | None]:
        """Stack a batch's images and hand them to the session's staging step (runs in the prefetch thread)."""
        good = batch.good
        if not good:
            return batch, None
        feed = {C.IMAGES: np.stack([x.image.pixels for x in good]),
                C.CLASS_INDEX: np.full(len(good), class_index, np.int32)}
        return batch, session.prepare(feed)

    start = time.perf_counter()
    writer = BackgroundWriter(write)
    try:
        for batch, staged in prefetch(map(stage, batches(loaded, config.batch_size))):
            outputs = session.run_prepared(staged) if staged is not None else None
            writer.put((batch, outputs))
            progress.update(len(batch.loaded))
    finally:
        writer.close()
        progress.close()
    flush()
    seconds = time.perf_counter() - start
    return run_dir.finish(listing, len(pending), seconds, session.device, f"{config.session.backend} {precision}",
                          {"overlays": bool(overlay_keys)})
