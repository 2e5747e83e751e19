"""`gradcam demo`: the whole job on the embedded demo (no download), as the README's first command."""
from __future__ import annotations

import argparse
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from engine.cli import quiet_tensorflow

    quiet_tensorflow()
    from demo.run import run_demo

    print(run_demo(Path(args.out), images=args.images, overlays=args.overlays, backend=args.backend).text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = sub.add_parser("demo", help="run the embedded demo: synthetic scenes, shipped model, overlays, pointing game")
    p.add_argument("--out", default="demo_out", help="where images, artifact and run go (default: demo_out/)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--overlays", type=int, default=16, help="overlays for the first N images")
    p.add_argument("--backend", default="onnx", choices=["onnx", "tf"])
    p.set_defaults(handler=_demo)
