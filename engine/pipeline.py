"""The streaming stages: read+decode in a thread pool (bounded, in order) -> batches -> runner -> writer thread.

Threads, not processes: PIL's decoders and resizers and ONNX Runtime all release the GIL, so threads overlap
decoding with inference without pickling pixels between processes (measured: see the README's Performance
section). Every queue is bounded, so memory stays flat however many images there are.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from gradcam_engine.engine.decode import DecodedImage, DecodeError, decode_image
from gradcam_engine.engine.inputs import InputItem, ReadError, read_bytes

T = TypeVar("T")
U = TypeVar("U")


@dataclass
class Loaded:
    """One input after reading and decoding: pixels, or the reason there are none."""

    key: str
    image: DecodedImage | None = None
    error: str | None = None


def load(item: InputItem, size: tuple[int, int], max_bytes: int, max_pixels: int, keep_original: bool) -> Loaded:
    """Read and decode one input; any failure becomes an error message naming the stage, never an exception."""
    try:
        data = read_bytes(item, max_bytes)
    except ReadError as e:
        return Loaded(item.key, error=f"{e} (read)")
    try:
        return Loaded(item.key, image=decode_image(data, size, max_pixels, keep_original=keep_original))
    except DecodeError as e:
        return Loaded(item.key, error=f"{e} (decode)")
    except MemoryError:
        return Loaded(item.key, error="out of memory while decoding (decode)")


def ordered_map(fn: Callable[[T], U], items: Iterable[T], workers: int, prefetch: int) -> Iterator[U]:
    """Like executor.map, but with at most `prefetch` items in flight, so a huge input list never piles up."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[U]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class LoadedBatch:
    """Up to batch_size loaded inputs in input order; errors travel with them so order is kept."""

    loaded: list[Loaded]

    @property
    def good(self) -> list[Loaded]:
        """The inputs that decoded, in order: the rows the model computes."""
        return [x for x in self.loaded if x.image is not None]


def batches(loaded: Iterable[Loaded], batch_size: int) -> Iterator[LoadedBatch]:
    """Group inputs so that each batch holds batch_size decoded images (plus the errors met on the way)."""
    current: list[Loaded] = []
    good = 0
    for x in loaded:
        current.append(x)
        good += x.image is not None
        if good >= batch_size:
            yield LoadedBatch(current)
            current, good = [], 0
    if current:
        yield LoadedBatch(current)


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Drive an iterator from a background thread, `depth` items ahead: the next batch is decoded, stacked and
    staged (copied to the GPU when bound) while the current one runs. Exceptions re-raise in the consumer."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", done))
        except BaseException as e:  # surfaced in the consumer
            box.put(("error", e))

    thread = threading.Thread(target=produce, name="stage", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


class BackgroundWriter:
    """Runs the write step in its own thread behind a bounded queue, so encoding overlays and Parquet overlaps
    the next batch's inference; an exception in the writer is raised in the caller on the next put or close."""

    def __init__(self, write: Callable[[object], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    self._write(job)
                except BaseException as e:  # surfaced in the main thread
                    self._error = e

    def put(self, job: object) -> None:
        if self._error:
            raise self._error
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error:
            raise self._error
