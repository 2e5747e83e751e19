"""`gradcam evaluate`: parse, build an EvaluateConfig, call evaluate, print the figures."""
from __future__ import annotations

import argparse

from gradcam_engine.cli.options import default, listed
from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate
from gradcam_engine.engine.faithfulness import BASELINES, KINDS
from gradcam_engine.engine.session import DEVICES, SessionOptions


def config_from(args: argparse.Namespace) -> EvaluateConfig:
    """The EvaluateConfig the flags describe."""
    return EvaluateConfig(
        run_dir=args.run_dir, labels=args.labels, labels_from_folders=args.labels_from_folders, boxes=args.boxes,
        root=args.root, methods=listed([args.methods]) if args.methods else (),
        faithfulness=listed([args.faithfulness]) if args.faithfulness else (), steps=args.steps, baseline=args.baseline,
        artifact=args.artifact,
        session=SessionOptions(backend="onnx", device=args.device, threads=args.threads),
        batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size, overwrite=args.overwrite)


def _evaluate(args: argparse.Namespace) -> int:
    print(evaluate(config_from(args)).text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = sub.add_parser("evaluate", help="score a run's CAMs against labels and boxes, and their faithfulness "
                                        "through the model, into RUN_DIR/metrics/ and metrics.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `gradcam run`")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="FILE", help="CSV with header path,label (label: class name or index)")
    labels.add_argument("--labels-from-folders", action="store_true",
                        help="each image's label is the name of its folder (ROOT/CLASS/IMAGE)")
    p.add_argument("--boxes", metavar="FILE", help="CSV with header path,x0,y0,x1,y1 (original pixels, one row per "
                                                   "box), or a COCO JSON file")
    p.add_argument("--root", metavar="DIR", help="relative paths in --labels/--boxes start here (default: the "
                                                 "file's own folder)")
    p.add_argument("--methods", metavar="NAMES",
                   help="comma-separated CAM methods of the run to evaluate, boxes and faithfulness alike (default: "
                        "all of them); faithfulness costs 2K - 1 forward passes per image for each")
    p.add_argument("--faithfulness", metavar="KINDS",
                   help=f"comma-separated, any of {','.join(KINDS)}: re-decode each image and perturb it through "
                        "the artifact")
    p.add_argument("--steps", type=int, default=default(EvaluateConfig, "steps"),
                   help="K of deletion/insertion: K + 1 points per curve")
    p.add_argument("--baseline", default=default(EvaluateConfig, "baseline"), choices=sorted(BASELINES),
                   help="what deleted pixels become: blur (Gaussian, sigma 5 px) or mean (the image's mean colour)")
    p.add_argument("--artifact", help="the run's artifact, if it has moved since the run")
    p.add_argument("--device", default=default(SessionOptions, "device"), choices=DEVICES)
    p.add_argument("--threads", type=int, default=default(SessionOptions, "threads"),
                   help="inference threads (default: the runtime's)")
    p.add_argument("--batch-size", type=int, default=default(EvaluateConfig, "batch_size"))
    p.add_argument("--workers", type=int, default=default(EvaluateConfig, "workers"),
                   help="threads: decoding for faithfulness, scoring otherwise (default: one per core)")
    p.add_argument("--shard-size", type=int, default=default(EvaluateConfig, "shard_size"),
                   help="inputs per metrics shard, the resume granularity (default: 4096, or 256 with faithfulness)")
    p.add_argument("--overwrite", action="store_true", help="replace metrics evaluated with other options")
    p.set_defaults(handler=_evaluate)
