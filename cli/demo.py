"""`gradcam demo`: the whole job on the embedded demo (no download), as the README's first command."""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from gradcam_engine.engine.session import BACKENDS


def _demo(args: argparse.Namespace) -> int:
    from gradcam_engine.engine.tf_import import import_tensorflow

    import_tensorflow("gradcam demo")
    from gradcam_engine.demo.run import run_demo

    print(run_demo(Path(args.out), images=args.images, overlays=args.overlays, backend=args.backend,
                   faithfulness=args.faithfulness).text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    from gradcam_engine.demo.run import run_demo

    defaults = {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}
    p = sub.add_parser("demo", help="run the embedded demo: synthetic scenes, shipped model, overlays, evaluate, "
                                    "report")
    p.add_argument("--out", default="demo_out", help="where images, artifact and run go (default: demo_out/)")
    p.add_argument("--images", type=int, default=defaults["images"])
    p.add_argument("--overlays", type=int, default=defaults["overlays"], help="overlays for the first N images")
    p.add_argument("--backend", default=defaults["backend"], choices=sorted(BACKENDS))
    p.add_argument("--faithfulness", default=defaults["faithfulness"], action=argparse.BooleanOptionalAction,
                   help="measure Average Drop and deletion/insertion through the artifact for all six CAM methods: "
                        "2 + 15 per method = 92 forward passes per image (K = 8), about 55x the run's time; "
                        "`gradcam evaluate --methods gradcam` measures one method (17 passes, about 10x)")
    p.set_defaults(handler=_demo)
