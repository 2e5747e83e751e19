"""Timing: round-robin repetitions over every configuration, so machine drift hits all contenders alike.

A configuration (a contender at one batch size over a fixed image set) is warmed up once, untimed (XLA compiles,
ONNX Runtime allocates), then timed in rounds: each round runs every configuration once, starting one place later
than the round before. Each timed repetition also records the process's peak resident memory above what was
resident when it started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gradcam_engine.bench.measure.machine import peak_mb, reset_peak, rss_mb

Array = np.ndarray
Log = Callable[[str], None]


@dataclass
class Unit:
    """One timed configuration."""

    contender: str
    kind: str
    runtime: str
    precision: str
    batch_size: int
    images: int                      # images processed per repetition
    run: Callable[[], list[float]]   # one repetition; returns the seconds of each batch it ran
    group: str = "model"             # model | end-to-end: which table it belongs to
    per_batch: bool = True           # run() times each batch; False when a repetition is one opaque call


@dataclass
class Timing:
    """What the rounds measured for one unit."""

    unit: Unit
    rep_seconds: list[float] = field(default_factory=list)
    rep_cpu_seconds: list[float] = field(default_factory=list)  # this process' CPU time per repetition: on a shared
                                                                # machine, less disturbed by others than wall time
    batch_seconds: list[float] = field(default_factory=list)
    run_peak_mb: float = 0.0         # highest (peak during a repetition - resident before it)
    peak_rss_mb: float = 0.0         # highest absolute peak during a repetition


def batched_run(call: Callable[[Array, Array], object], images: Array, class_index: Array,
                batch_size: int) -> Callable[[], list[float]]:
    """A repetition that feeds `images` through `call` in batches, timing each batch."""
    def run() -> list[float]:
        seconds = []
        for i in range(0, len(images), batch_size):
            start = time.perf_counter()
            call(images[i:i + batch_size], class_index[i:i + batch_size])
            seconds.append(time.perf_counter() - start)
        return seconds
    return run


def _timed(unit: Unit, timing: Timing) -> None:
    before = rss_mb()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    batches = unit.run()
    timing.rep_seconds.append(time.perf_counter() - start)
    timing.rep_cpu_seconds.append(time.process_time() - cpu)
    timing.batch_seconds.extend(batches)
    peak = peak_mb()
    timing.run_peak_mb = max(timing.run_peak_mb, peak - before)
    timing.peak_rss_mb = max(timing.peak_rss_mb, peak)


def round_robin(units: list[Unit], reps: int, warmup: int = 1, log: Log = lambda _: None) -> list[Timing]:
    """Warm every unit up, then run `reps` rounds, each unit once per round, rotating the start."""
    timings = [Timing(u) for u in units]
    for u in units:
        for _ in range(warmup):
            start = time.perf_counter()
            u.run()
            log(f"warm-up {u.contender} b={u.batch_size}: {time.perf_counter() - start:.1f} s")
    for r in range(reps):
        start = time.perf_counter()
        shift = r % max(len(units), 1)
        for i in list(range(shift, len(units))) + list(range(shift)):
            _timed(units[i], timings[i])
        log(f"round {r + 1}/{reps}: {time.perf_counter() - start:.1f} s")
    return timings


def summarize(timing: Timing) -> dict[str, float | None]:
    """img/s median/min/max over repetitions, latency per batch p50/p95 in ms."""
    rates = [timing.unit.images / s for s in timing.rep_seconds if s > 0]
    lat = np.asarray(timing.batch_seconds if timing.unit.per_batch else []) * 1000.0
    return {
        "images_per_second": float(np.median(rates)) if rates else None,
        "images_per_second_min": float(min(rates)) if rates else None,
        "images_per_second_max": float(max(rates)) if rates else None,
        "repetitions": len(rates),
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
    }
