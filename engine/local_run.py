"""`run_gradcam`: the local run loop, an artifact and image inputs -> a run directory in this process.

One path for the data: list -> read/decode (threads) -> batch -> session -> writer (shards, overlays).
Resumable: rows already committed and verified in results/ are skipped (engine.rundir). A shard is committed when
it holds --shard-size rows or its first row is --commit-seconds old, whichever comes first. The first SIGINT or
SIGTERM stops taking inputs and commits what is in flight; a second one leaves at once (engine.signals).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import load_artifact
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.inputs import InputItem, list_inputs
from gradcam_engine.engine.overlay import write_overlays
from gradcam_engine.engine.pipeline import BackgroundWriter, LoadedBatch, batches, load, ordered_map, prefetch
from gradcam_engine.engine.progress import Progress
from gradcam_engine.engine.results import batch_rows, concat, results_schema, to_table
from gradcam_engine.engine.run_config import RunConfig, parse_overlays, resolve_overlay_method, resolve_target
from gradcam_engine.engine.rundir import RunDirectory, RunSummary, fingerprint
from gradcam_engine.engine.session import GradCAMSession, Prepared, Session
from gradcam_engine.engine.signals import GracefulStop, RunInterrupted


@dataclass(frozen=True)
class OutputShape:
    """What a row holds for this artifact: its CAM methods (their result columns) and the one overlays show."""

    methods: tuple[str, ...]
    overlay_index: int

    @property
    def schema(self) -> pa.Schema:
        return results_schema(self.methods)


def run_gradcam(config: RunConfig, session: Session | None = None) -> RunSummary:
    """Stream every input through the artifact's graph and write one result row per input."""
    config.check()
    with GracefulStop(exit_at_once=config.exit_on_second_signal) as stop:
        return _run(config, session, stop)


def _until_stopped(items: Iterable[InputItem], stop: GracefulStop) -> Iterator[InputItem]:
    """The inputs, until a stop is asked for: what is already being decoded still finishes."""
    for item in items:
        if stop.requested is not None:
            return
        yield item


def _run(config: RunConfig, session: Session | None, stop: GracefulStop) -> RunSummary:
    overlay_limit = parse_overlays(config.overlays)
    listing = list_inputs(config.inputs)  # raises InputError for a missing path, before anything is written
    run_dir = RunDirectory(config.out)
    with run_dir.opened():  # the lock first: a second run is refused before it loads a model
        stop.on_abort = run_dir.abort
        if session is None:
            session = GradCAMSession(load_artifact(config.artifact, verify=[]), config.session_options())
        artifact = session.artifact
        labels = artifact.class_names
        class_index = resolve_target(config.target, labels)
        methods = artifact.methods
        overlay_index = resolve_overlay_method(config.overlay_method, methods)
        precision = session.precision
        run_fingerprint = fingerprint(config, artifact.checksum, class_index, precision)
        backend = f"{config.session.backend} {precision}"
        if stop.requested is not None:
            raise RunInterrupted("interrupted before the run started; nothing was written", stop.requested)
        run_dir.prepare(run_fingerprint, config.overwrite, methods)
        pending = run_dir.pending(listing)
        overlay_keys = {item.key for item in listing.items[:overlay_limit]} if overlay_limit else set()
        note = getattr(session, "precision_note", "")  # a stand-in session may have none
        if note:
            print(f"gradcam run: {note}", file=sys.stderr)
        run_dir.start(config, run_fingerprint, session.device, precision, overlays=bool(overlay_keys),
                      methods=list(methods), precision_note=note)
        extra = {"overlays": bool(overlay_keys)}
        start = time.perf_counter()
        _stream(config, session, run_dir, [item for _, item in pending], overlay_keys, class_index, labels,
                OutputShape(methods, overlay_index), stop)
        seconds = time.perf_counter() - start
        if stop.requested is not None:
            raise run_dir.interrupted(stop.requested, listing, seconds, session.device, backend, extra)
        return run_dir.finish(listing, run_dir.committed_this_run, seconds, session.device, backend, extra)


def _stream(config: RunConfig, session: Session, run_dir: RunDirectory, items: list[InputItem],
            overlay_keys: set[str], class_index: int, labels: list[str], shape: OutputShape,
            stop: GracefulStop) -> None:
    """Decode, infer and commit `items`; returns when all are committed, or what was in flight after a stop."""
    size = session.artifact.input_size
    workers = config.workers or max(1, os.cpu_count() or 1)
    in_flight = max(2 * config.batch_size, 4 * workers)
    loaded = ordered_map(lambda item: load(item, size, config.max_bytes, config.max_pixels,
                                           item.key in overlay_keys), _until_stopped(items, stop), workers,
                         in_flight)
    shard: list[dict[str, list[Any]]] = []
    shard_rows = 0
    opened_at = 0.0
    progress = Progress(len(items), enabled=config.progress)

    def flush() -> None:
        nonlocal shard, shard_rows
        if shard:
            run_dir.commit(to_table(concat(shard), shape.schema))
        shard, shard_rows = [], 0

    def write(job: tuple[LoadedBatch, dict[str, np.ndarray] | None]) -> None:
        nonlocal shard_rows, opened_at
        batch, outputs = job
        columns = batch_rows(batch, outputs, labels, shape.methods)
        try:
            write_overlays(run_dir.overlays, batch, outputs, shape.overlay_index)
        except OSError as e:
            raise RunError(f"{run_dir.overlays}: cannot write an overlay ({e.strerror or e}); nothing committed "
                           "is lost: fix the cause and rerun the same command") from None
        if not shard:
            opened_at = time.monotonic()
        shard.append(columns)
        shard_rows += len(columns["path"])
        if shard_rows >= config.shard_size or time.monotonic() - opened_at >= config.commit_seconds:
            flush()

    def stage(batch: LoadedBatch) -> tuple[LoadedBatch, Prepared | None]:
        """Stack a batch's images and hand them to the session's staging step (runs in the prefetch thread)."""
        good = batch.good
        if not good:
            return batch, None
        feed = {C.IMAGES: np.stack([x.image.pixels for x in good]),
                C.CLASS_INDEX: np.full(len(good), class_index, np.int32)}
        return batch, session.prepare(feed)

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
