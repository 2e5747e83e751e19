"""One contender in a fresh process: load it, run one batch, report the process's peak resident memory.

In one long process, allocators keep what earlier contenders freed, so a later contender's peak says little about
its own needs. Here the peak belongs to this contender alone: the runtime's import, the loaded model and the batch.
Prints one JSON line: baseline_rss_mb (after imports), loaded_rss_mb (after building), peak_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Build the contender named by its JSON spec, run a batch twice (warm-up, then measured), report memory."""
    p = argparse.ArgumentParser(prog="python -m gradcam_engine.bench.measure.memory_worker")
    p.add_argument("spec", help="JSON of bench.contenders.Spec")
    p.add_argument("sources", help="JSON of bench.contenders.Sources")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import numpy as np

    from gradcam_engine.bench.contenders import Sources, Spec, make
    from gradcam_engine.bench.measure.images import scene_images
    from gradcam_engine.bench.measure.machine import peak_mb, rss_mb

    spec, sources = Spec(**json.loads(args.spec)), Sources(**json.loads(args.sources))
    images = scene_images(args.batch_size, tuple(args.size), seed=1)
    class_index = np.full(len(images), -1, np.int32)
    if spec.backend != "onnx":
        import tensorflow  # noqa: F401  (imported before the baseline, as the runtime the contender needs)
    baseline = rss_mb()
    contender = make(spec, sources)
    loaded = rss_mb()
    for _ in range(2):
        contender.call(images, class_index)
    print(json.dumps({"baseline_rss_mb": baseline, "loaded_rss_mb": loaded, "peak_rss_mb": peak_mb(),
                      "batch_size": args.batch_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
