"""`gradcam run`: parse, build a RunConfig, call run_gradcam or run_gradcam_ray (--runner ray), print the summary."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from gradcam_engine.cli.options import default
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import BACKENDS, DEVICES, PRECISIONS, SessionOptions

RUNNERS = ("local", "ray")


def config_from(args: argparse.Namespace) -> RunConfig:
    """The RunConfig the flags describe."""
    session = SessionOptions(
        backend=args.backend, device=args.device, threads=args.threads, precision=args.precision,
        io_binding=args.io_binding, fixed_batch=args.batch_size if (args.fixed_batch or args.cuda_graph) else 0,
        cuda_graph=args.cuda_graph, trt=args.trt)
    commit_seconds = default(RunConfig, "commit_seconds") if args.commit_seconds is None else args.commit_seconds
    return RunConfig(artifact=args.artifact, inputs=args.inputs, out=args.out, session=session,
                     batch_size=args.batch_size, target=args.target, overlays=args.overlays, workers=args.workers,
                     shard_size=args.shard_size, commit_seconds=commit_seconds, overwrite=args.overwrite,
                     exit_on_second_signal=True, overlay_method=args.overlay_method)


def ray_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray runner's flags given, named as RayOptions' fields (init_kwargs is for library callers alone).
    Read when a run starts: engine.ray_run loads no Ray, but more than `gradcam --help` needs."""
    from gradcam_engine.engine.ray_run import RayOptions

    names = (f.name for f in dataclasses.fields(RayOptions) if f.name != "init_kwargs")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run(args: argparse.Namespace) -> int:
    from gradcam_engine.engine.signals import RunInterrupted

    try:
        return _start(args)
    except RunInterrupted as e:
        print(f"gradcam run: {e}", file=sys.stderr)
        return e.exit_code


def _start(args: argparse.Namespace) -> int:
    config = config_from(args)
    flags = ray_flags(args)
    if args.runner == "ray":
        if args.commit_seconds is not None:  # Ray Data gives each writer task --shard-size rows: no clock to cut by
            raise RunError("--commit-seconds needs --runner local: a Ray run commits a shard every --shard-size rows; "
                           "lower --shard-size to lose less to a kill")
        from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

        print(run_gradcam_ray(config, RayOptions(**flags)).text())
        return 0
    if flags:
        raise RunError(f"--{next(iter(flags)).replace('_', '-')} needs --runner ray")
    from gradcam_engine.engine.local_run import run_gradcam

    print(run_gradcam(config).text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `run` subcommand."""
    p = sub.add_parser("run", help="stream images through an exported artifact into Parquet results")
    p.add_argument("artifact", help="artifact directory made by `gradcam export`")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image directory (recursive), glob, text file of paths, .tar shard, or image file; "
                        "local paths or URIs (s3://, gs://, hdfs://, file://)")
    p.add_argument("--out", required=True, help="run directory (results/, overlays/, run.json)")
    p.add_argument("--backend", default=default(SessionOptions, "backend"), choices=sorted(BACKENDS))
    p.add_argument("--device", default=default(SessionOptions, "device"), choices=DEVICES)
    p.add_argument("--batch-size", type=int, default=default(RunConfig, "batch_size"))
    p.add_argument("--target", default=default(RunConfig, "target"),
                   help="predicted, a class index, or a class name")
    p.add_argument("--overlays", default=default(RunConfig, "overlays"),
                   help="none, all, or N (overlays for the first N images)")
    p.add_argument("--overlay-method", default=default(RunConfig, "overlay_method"), metavar="METHOD",
                   help="the CAM method overlays show, one of the artifact's (default: its first)")
    p.add_argument("--workers", type=int, default=default(RunConfig, "workers"),
                   help="decode threads (default: one per core)")
    p.add_argument("--threads", type=int, default=default(SessionOptions, "threads"),
                   help="inference threads (default: the runtime's)")
    p.add_argument("--shard-size", type=int, default=default(RunConfig, "shard_size"),
                   help="rows per Parquet shard (resume granularity)")
    p.add_argument("--commit-seconds", type=float, default=None,
                   help="also commit a shard once its first row is this many seconds old (bounds what a kill loses; "
                        f"default {default(RunConfig, 'commit_seconds'):g}; local runner only)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different earlier run")
    p.add_argument("--precision", default=default(SessionOptions, "precision"), choices=PRECISIONS,
                   help="auto: fp16 on CUDA when the artifact has it, else fp32; fast: the fastest reduced precision "
                        "here that export's precision gate judged and passed (int8 on a CPU with VNNI/AMX, bf16 with "
                        "--backend tf on a CPU with avx512_bf16/AMX, fp16 on CUDA), else as auto")
    p.add_argument("--io-binding", default=None, action=argparse.BooleanOptionalAction,
                   help="ONNX Runtime IO binding (default: on for CUDA)")
    p.add_argument("--fixed-batch", action="store_true", help="pad the last batch to --batch-size (stable shapes)")
    p.add_argument("--cuda-graph", action="store_true", help="ONNX Runtime CUDA graphs (implies --fixed-batch)")
    p.add_argument("--trt", action="store_true", help="TensorRT execution provider, fp16, engine cache in RUN_DIR")
    p.add_argument("--runner", default="local", choices=RUNNERS,
                   help="local: this process; ray: Ray Data tasks and actors on a local or remote Ray cluster")
    p.add_argument("--address", help="--runner ray: join this cluster (auto, or ray://HOST:10001); "
                                     "default: $RAY_ADDRESS, else start a local Ray")
    p.add_argument("--num-gpus-per-worker", type=float, help="--runner ray: GPUs per model replica (CUDA when > 0)")
    p.add_argument("--num-cpus-per-worker", type=float, help="--runner ray: CPUs (and inference threads) per replica")
    p.add_argument("--concurrency", type=int, help="--runner ray: model replicas (default: one per GPU share, "
                                                   "else 1 up to half the cluster's CPUs)")
    p.set_defaults(handler=_run)
