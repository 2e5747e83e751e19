"""How fast `gradcam evaluate` goes: box and label metrics from Parquet alone, and faithfulness against `run`.

    python -m gradcam_engine.bench.tools.evaluate_speed boxes [--rows 50000] [--repeat 3] [--workers N] [--methods 1,6]
    python -m gradcam_engine.bench.tools.evaluate_speed faithfulness DEMO_OUT [--repeat 2] [--methods gradcam]

`boxes` writes synthetic run directories (the engine's results schema, CAM-like maps: a few blobs, ReLU, divided by
the max; 1 or 2 boxes per image; labels for every image) for several image and CAM sizes, plus one with rough,
random maps (the worst case for the IoU count), and times the whole `evaluate` (read results, match labels and
boxes by path, score, write metrics/ and metrics.json), best and median of `repeat`. `--methods 1,6` repeats it with
runs holding that many CAM methods (one CAM column each): rows/s counts results rows (inputs), each scored for every
method.

`faithfulness` takes the directory `gradcam demo` wrote (its artifact and scenes), then times `run` and
`evaluate --faithfulness drop,deletion,insertion` over the same images alternately, and prints the ratio: for every
CAM method of the artifact, or for those `--methods` names.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate
from gradcam_engine.engine.overlay import upsample
from gradcam_engine.engine.results import (method_columns, publish_shard, results_schema, shard_name, stage_shard,
                                           to_table)

SHAPES = [  # (image width, height), (CAM height, width), maps
    ((96, 96), (12, 12), "smooth"),     # the demo
    ((224, 224), (14, 14), "smooth"),   # a 224 input, stride 16
    ((500, 375), (7, 7), "smooth"),     # ImageNet-sized photos, ResNet50's last block
    ((500, 375), (7, 7), "rough"),      # every cell random: the threshold crosses nearly everywhere
]


def cam_maps(rng: np.random.Generator, n: int, h: int, w: int, kind: str) -> np.ndarray:
    if kind == "rough":
        cams = rng.random((n, h, w))
    else:
        coarse = rng.normal(size=(n, 3, 3)).astype(np.float32)
        cams = np.maximum(upsample(coarse, h, w) + 0.1 * rng.normal(size=(n, h, w)), 0)
    peak = cams.reshape(n, -1).max(axis=1)
    return (cams / np.where(peak > 0, peak, 1)[:, None, None]).astype(np.float32)


def synthetic_run(folder: Path, rows: int, size: tuple[int, int], cam: tuple[int, int], kind: str,
                  shard: int = 4096, methods: int = 1) -> tuple[Path, Path, Path]:
    """A run directory with `rows` ok results of `methods` CAM methods (columns as a run writes them: `cam`, and
    `cam_<method>` for each when there are several), and labels and boxes CSVs naming them as the results do."""
    rng = np.random.default_rng(0)
    run_dir = folder / "run"
    width, height = size
    classes = [f"class_{i}" for i in range(10)]
    names = ["gradcam"] + [f"m{m}" for m in range(1, methods)]
    schema = results_schema(names)
    with open(folder / "labels.csv", "w", newline="") as labels_fh, open(folder / "boxes.csv", "w", newline="") as fh:
        labels, boxes = csv.writer(labels_fh), csv.writer(fh)
        labels.writerow(["path", "label"])
        boxes.writerow(["path", "x0", "y0", "x1", "y1"])
        for start in range(0, rows, shard):
            n = min(shard, rows - start)
            paths = [f"/data/images/{i // 1000:04d}/img_{i:08d}.jpg" for i in range(start, start + n)]
            predicted = rng.integers(0, 10, n)
            scores = rng.uniform(0.2, 1.0, n).astype(np.float32)
            maps = [cam_maps(rng, n, *cam, kind).reshape(n, -1) for _ in names]
            table = to_table({
                "path": paths, "status": ["ok"] * n, "error": [None] * n, "width": [width] * n,
                "height": [height] * n, "predicted_class": predicted.tolist(),
                "predicted_label": [classes[c] for c in predicted], "predicted_score": scores.tolist(),
                "target_class": predicted.tolist(), "target_score": scores.tolist(),
                "cam": list(maps[0]), "cam_height": [cam[0]] * n, "cam_width": [cam[1]] * n,
                **{column: list(m) for column, m in zip(method_columns(names), maps)}}, schema)
            name = shard_name("bench", f"{start:09d}")
            publish_shard(stage_shard(folder / "staging", table, name, "")[0], run_dir / "results", name)
            for i, path in enumerate(paths):
                labels.writerow([path, classes[(predicted[i] + (i % 7 == 0)) % 10]])
                for _ in range(1 + (i % 3 == 0)):
                    x0, y0 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
                    boxes.writerow([path, round(x0, 1), round(y0, 1), round(x0 + width * rng.uniform(0.1, 0.4), 1),
                                    round(y0 + height * rng.uniform(0.1, 0.4), 1)])
    (run_dir / "run.json").write_text(json.dumps({"status": "complete", "fingerprint": {"synthetic": rows},
                                                  "artifact": "", "options": {}, "methods": names}))
    return run_dir, folder / "labels.csv", folder / "boxes.csv"


def bench_boxes(rows: int, repeat: int, workers: int, methods: tuple[int, ...] = (1,)) -> None:
    print(f"evaluate --labels --boxes on {rows:,} results rows (Parquet only), {workers or 'all'} worker(s), best / "
          f"median of {repeat}; rows are inputs, each scored for every CAM method:")
    for (size, cam, kind), count in itertools.product(SHAPES, methods):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir, labels, boxes = synthetic_run(Path(tmp), rows, size, cam, kind, methods=count)
            times, cpu = [], []
            for _ in range(repeat):
                shutil.rmtree(run_dir / "metrics", ignore_errors=True)  # a first evaluation each time
                (run_dir / "metrics.json").unlink(missing_ok=True)
                start, start_cpu = time.perf_counter(), time.process_time()
                evaluate(EvaluateConfig(str(run_dir), labels=str(labels), boxes=str(boxes), workers=workers,
                                        progress=False))
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            # CPU seconds too: on a shared machine the wall clock also counts other people's work (with one worker,
            # rows per CPU second is what one idle core does).
            print(f"  images {size[0]}x{size[1]}, CAM {cam[0]}x{cam[1]} {kind:6s}, {count} method"
                  f"{'s' if count > 1 else ' '}: {rows / min(times):9,.0f} rows/s "
                  f"best, {rows / statistics.median(times):9,.0f} median; {rows / min(cpu):9,.0f} rows per CPU "
                  "second")


def bench_faithfulness(demo: Path, repeat: int, methods: tuple[str, ...] = ()) -> None:
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions

    images, artifact = demo / "images", demo / "artifact"
    session = SessionOptions(backend="onnx", device="cpu")
    run_times, eval_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            run_dir = Path(tmp) / f"run{r}"
            start = time.perf_counter()
            summary = run_gradcam(RunConfig(artifact=str(artifact), inputs=[str(images)], out=str(run_dir),
                                            session=session, progress=False))
            run_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            info = evaluate(EvaluateConfig(str(run_dir), faithfulness=("drop", "deletion", "insertion"),
                                           methods=methods, session=session, progress=False)).info
            eval_times.append(time.perf_counter() - start)
    run_s, eval_s = statistics.median(run_times), statistics.median(eval_times)
    chosen = info["methods"]
    print(f"{summary.ok} images: run {run_s:.2f} s, evaluate --faithfulness drop,deletion,insertion (K = 8) of "
          f"{len(chosen)} CAM method{'s' if len(chosen) > 1 else ''} ({','.join(chosen)}; {2 + 15 * len(chosen)} "
          f"forward passes per image) {eval_s:.2f} s: {eval_s / run_s:.1f}x the run (medians of {repeat}, "
          "alternated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    boxes = sub.add_parser("boxes")
    boxes.add_argument("--rows", type=int, default=50_000)
    boxes.add_argument("--repeat", type=int, default=3)
    boxes.add_argument("--workers", type=int, default=0, help="scoring threads (default: one per core)")
    boxes.add_argument("--methods", default="1", help="comma-separated counts of CAM methods per run (default: 1)")
    faith = sub.add_parser("faithfulness")
    faith.add_argument("demo", type=Path, help="the directory `gradcam demo` wrote")
    faith.add_argument("--repeat", type=int, default=2)
    faith.add_argument("--methods", default="", help="comma-separated CAM methods to evaluate (default: all)")
    args = parser.parse_args()
    if args.what == "boxes":
        bench_boxes(args.rows, args.repeat, args.workers, tuple(int(n) for n in args.methods.split(",")))
    else:
        bench_faithfulness(args.demo, args.repeat, tuple(m for m in args.methods.split(",") if m))


if __name__ == "__main__":
    main()
