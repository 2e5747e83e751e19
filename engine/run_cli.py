"""`gradcam run`: parse, build a RunConfig, call run_gradcam, print the summary."""
from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from engine.run import RunConfig, run_gradcam

    config = RunConfig(
        artifact=args.artifact, inputs=args.inputs, out=args.out, backend=args.backend, device=args.device,
        batch_size=args.batch_size, target=args.target, overlays=args.overlays, workers=args.workers,
        shard_size=args.shard_size, overwrite=args.overwrite, threads=args.threads)
    print(run_gradcam(config).text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `run` subcommand."""
    p = sub.add_parser("run", help="stream images through an exported artifact into Parquet results")
    p.add_argument("artifact", help="artifact directory made by `gradcam export`")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image directory (recursive), glob, text file of paths, .tar shard, or image file")
    p.add_argument("--out", required=True, help="run directory (results/, overlays/, run.json)")
    p.add_argument("--backend", default="onnx", choices=["onnx", "tf"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--target", default="predicted", help="predicted, a class index, or a class name")
    p.add_argument("--overlays", default="none", help="none, all, or N (overlays for the first N images)")
    p.add_argument("--workers", type=int, default=0, help="decode threads (default: one per core)")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: the runtime's)")
    p.add_argument("--shard-size", type=int, default=4096, help="rows per Parquet shard (resume granularity)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different earlier run")
    p.set_defaults(handler=_run)
