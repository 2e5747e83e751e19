"""`gradcam report`: one self-contained HTML page about a run (and its metrics, when evaluated)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from gradcam_engine.report import DEFAULT_GALLERY, DEFAULT_NAME, write_report

SCREENSHOT_HEIGHT = 1400  # the top of the page: summary, evaluation, per-class table and the first plots


def save_screenshot(page: Path, out: Path, width: int) -> list[str]:
    """Open the page in headless Chromium, save a PNG of its top `width` pixels wide (palette colours, small
    enough for a README), and return what the page logged as errors."""
    from PIL import Image

    from gradcam_engine.report.browser import Chromium

    with Chromium(width=width, height=SCREENSHOT_HEIGHT) as browser:
        browser.open(page)
        browser.evaluate("Promise.all(Array.from(document.images).map(function (i) { return i.decode()"
                         ".catch(function () {}); }))")
        png = browser.screenshot()
        errors = list(browser.errors)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return errors


def _report(args: argparse.Namespace) -> int:
    summary = write_report(args.run_dir, args.out, gallery=args.gallery)
    print(summary.text())
    if args.screenshot:
        errors = save_screenshot(summary.path, Path(args.screenshot), args.screenshot_width)
        print(f"Screenshot: {args.screenshot}" + (f"; the page logged errors: {'; '.join(errors)}" if errors else ""))
        return 1 if errors else 0
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand."""
    p = sub.add_parser("report", help="write one self-contained HTML page about a run: summary, per-class table, "
                                      "plots, a gallery of overlays, errors")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `gradcam run`")
    p.add_argument("--out", metavar="FILE", help=f"where to write the page (default: RUN_DIR/{DEFAULT_NAME})")
    p.add_argument("--gallery", type=int, default=DEFAULT_GALLERY, metavar="N",
                   help="images per gallery section (most and least confident, misclassified, worst localised)")
    p.add_argument("--screenshot", metavar="PNG", help="also open the page in headless Chromium and save a PNG of "
                                                       "its top (needs the chromium package)")
    p.add_argument("--screenshot-width", type=int, default=1000, metavar="PX")
    p.set_defaults(handler=_report)
