"""`gradcam bench`: parse, build a BenchConfig from a preset and the flags, call run_bench, print the Markdown."""
from __future__ import annotations

import argparse
import sys
import time

from gradcam_engine.cli.options import listed as _list
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.session import DEVICES


def _positive(values: tuple | None) -> tuple | None:
    return None if values is None else tuple(v for v in values if v > 0)


def _bench(args: argparse.Namespace) -> int:
    from gradcam_engine.bench.main import preset, run_bench
    from gradcam_engine.bench.report.markdown import markdown

    config = preset(
        args.quick, args.hardware, model=args.model, backends=_list(args.backends),
        batch_sizes=_list(args.batch_sizes, int), images=args.images, reference_images=args.reference_images,
        reps=args.reps, e2e_images=args.e2e_images, e2e_batch_size=args.e2e_batch_size,
        dataset_sizes=_positive(_list(args.dataset_sizes, int)), device=args.device, threads=args.threads,
        preprocess=args.preprocess, work_dir=args.work_dir, json_path=args.json, plot_path=args.plot,
        methods=_list(args.methods), precisions=_list(args.precisions))
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    report = run_bench(config, log)
    print(markdown(report))
    print(f"\nWall time: {report['wall_seconds']:.0f} s"
          + (f"; JSON {args.json}" if args.json else "") + (f"; chart {args.plot}" if args.plot else ""))
    return 1 if any(not c["ok"] for c in report["checks"]) else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand."""
    from gradcam_engine.bench.contenders.models import SEED_RESNET50
    from gradcam_engine.bench.main import BENCH_PRECISIONS, CONTENDER_GROUPS

    p = sub.add_parser("bench", help="benchmark the fused graph against the per-image reference, forward-only "
                                     "and end to end")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a laptop CPU, export included")
    p.add_argument("--hardware", action="store_true",
                   help="synthetic batches only: every backend, precision and device here, best configuration last")
    p.add_argument("--model", default=SEED_RESNET50,
                   help="seed-resnet50 (ResNet50 + GAP + Dropout + Dense(2), random weights), a .keras file, or an "
                        "artifact directory")
    p.add_argument("--backends", nargs="+", help=f"any of {' '.join(CONTENDER_GROUPS)} (default: all)")
    p.add_argument("--batch-sizes", nargs="+", help="batch sizes to sweep, e.g. 1 8 32")
    p.add_argument("--images", type=int, help="images per timed repetition")
    p.add_argument("--reference-images", type=int, help="images the reference is checked and timed on")
    p.add_argument("--reps", type=int, help="timed rounds after the warm-up (at least 5 for a median)")
    p.add_argument("--e2e-images", type=int, help="JPEG files in the timed end-to-end runs")
    p.add_argument("--e2e-batch-size", type=int)
    p.add_argument("--dataset-sizes", nargs="+", help="end-to-end sizes, each run in a fresh process (0 to skip)")
    p.add_argument("--methods", nargs="+", help="CAM methods of the all-methods contenders, timed against Grad-CAM "
                                                "alone (default: all of them; gradcam alone: none)")
    p.add_argument("--device", default=None, choices=DEVICES)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the runtime's)")
    p.add_argument("--preprocess", choices=C.PREPROCESSING,
                   help="input scaling for a .keras --model (seed-resnet50 uses caffe)")
    p.add_argument("--work-dir", help="cache of exports and JPEG sets (default ~/.cache/gradcam-engine/bench)")
    p.add_argument("--precisions", nargs="+",
                   help=f"on CPU, any of {' '.join(BENCH_PRECISIONS)} (default: all; int8 exports an int8 file "
                        "calibrated on scene images, bf16 needs a CPU with avx512_bf16 or AMX)")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--plot", help="write the img/s chart as PNG")
    p.set_defaults(handler=_bench)
