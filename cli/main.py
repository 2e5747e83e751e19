"""`gradcam`: the parser with every subcommand registered explicitly, and the one place user errors are printed."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gradcam_engine.cli import bench, demo, evaluate, export, report, run
from gradcam_engine.engine.errors import UserError

# Each module adds its subcommand with `register(subparsers)`; the handler it sets returns the exit code.
SUBCOMMANDS = (export, run, evaluate, report, demo, bench)


def build_parser() -> argparse.ArgumentParser:
    """The full command line, one subparser per job."""
    parser = argparse.ArgumentParser(prog="gradcam", description="Grad-CAM explanations at dataset scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gradcam` command; user errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"gradcam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradcam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
