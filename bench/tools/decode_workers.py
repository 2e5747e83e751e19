"""Threads or processes for decoding? Measured side by side on the same JPEG files, as the engine decodes them.

`python -m gradcam_engine.bench.tools.decode_workers [--images 400] [--workers N] [--size 224]` prints img/s for:
one thread, a thread pool, and a process pool (pixels pickled back to the parent, as a process-based pipeline
must). The engine uses threads; this is the measurement behind that choice.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gradcam_engine.engine.decode import decode_image


def _decode(args: tuple[str, tuple[int, int]]) -> np.ndarray:
    path, size = args
    return decode_image(Path(path).read_bytes(), size).pixels


def write_jpegs(folder: Path, n: int, shape: tuple[int, int] = (375, 500), seed: int = 0) -> list[str]:
    """n photo-sized JPEGs (smooth gradients plus noise, so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    paths = []
    for i in range(n):
        base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 255
                         for _ in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def measure(paths: list[str], size: tuple[int, int], workers: int, repeats: int = 3) -> dict[str, float]:
    """Median img/s of each strategy over `repeats` alternated rounds."""
    jobs = [(p, size) for p in paths]
    pools: dict[str, Executor | None] = {"one thread": None, f"{workers} threads": ThreadPoolExecutor(workers),
                                         f"{workers} processes": ProcessPoolExecutor(workers)}
    times: dict[str, list[float]] = {k: [] for k in pools}
    try:
        for name, pool in pools.items():  # warm-up: start processes, page in libraries
            list(pool.map(_decode, jobs[:8], chunksize=1) if pool else map(_decode, jobs[:8]))
        for _ in range(repeats):
            for name, pool in pools.items():
                t0 = time.perf_counter()
                list(pool.map(_decode, jobs, chunksize=4) if pool else map(_decode, jobs))
                times[name].append(time.perf_counter() - t0)
    finally:
        for pool in pools.values():
            if pool:
                pool.shutdown()
    return {k: len(paths) / statistics.median(v) for k, v in times.items()}


def main() -> None:
    """Print the comparison as a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.tools.decode_workers")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        rates = measure(paths, (args.size, args.size), args.workers)
    print(f"| decode {args.images} JPEGs 500x375 -> {args.size}x{args.size} | img/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
