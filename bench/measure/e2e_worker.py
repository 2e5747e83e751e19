"""One end-to-end run in a fresh process, for memory figures that belong to that run alone.

Prints one JSON line: images, images_per_second (streaming, as run.json reports it), wall_seconds (with the session
load), peak_rss_mb (the process's high-water mark, imports included) and baseline_rss_mb (resident after imports).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from gradcam_engine.cli.options import default
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import BACKENDS, DEVICES, SessionOptions


def main(argv: Sequence[str] | None = None) -> int:
    """Run `run_gradcam` once and report it; the bench parent reads the last stdout line."""
    p = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.measure.e2e_worker")
    p.add_argument("artifact")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=default(RunConfig, "batch_size"))
    p.add_argument("--backend", default=default(SessionOptions, "backend"), choices=sorted(BACKENDS))
    p.add_argument("--device", default=default(SessionOptions, "device"), choices=DEVICES)
    args = p.parse_args(argv)

    from gradcam_engine.bench.measure.e2e import run_config
    from gradcam_engine.bench.measure.machine import peak_mb, rss_mb
    from gradcam_engine.engine.local_run import run_gradcam

    baseline = rss_mb()
    start = time.perf_counter()
    summary = run_gradcam(run_config(args.artifact, args.inputs, args.out, args.batch_size, args.backend,
                                     args.device))
    seconds = time.perf_counter() - start
    print(json.dumps({"images": summary.images, "ok": summary.ok, "errors": summary.errors,
                      "images_per_second": summary.images_per_second, "pipeline_seconds": summary.seconds,
                      "wall_seconds": seconds, "peak_rss_mb": peak_mb(), "baseline_rss_mb": baseline}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
