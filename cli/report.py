"""`gradcam report`: one self-contained HTML page about a run (and its metrics, when evaluated)."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from gradcam_engine.report import DEFAULT_GALLERY, DEFAULT_NAME, write_report

GALLERY_HEIGHT = 820  # pixels of the gallery shown under the summary: its heading and first row or two


def save_screenshot(page: Path, out: Path, width: int) -> list[str]:
    """Open the page in headless Chromium and save an overview PNG `width` pixels wide: the page from its top down
    to the plots (summary, evaluation, per-class table), then the first rows of the gallery; palette colours keep it
    small enough for a README. Returns what the page logged as errors."""
    from PIL import Image

    from gradcam_engine.report.browser import Chromium

    with Chromium(width=width, height=1000) as browser:
        browser.open(page)
        browser.evaluate("Promise.all(Array.from(document.images).map(function (i) { return i.decode()"
                         ".catch(function () {}); }))")
        marks = browser.evaluate("""(function () {
            function top(el) { return el ? Math.round(el.getBoundingClientRect().top + window.scrollY) : null; }
            var plots = Array.from(document.querySelectorAll('h2')).filter(function (h) {
                return h.textContent === 'Plots'; })[0];
            return {plots: top(plots), gallery: top(document.getElementById('gallery'))};
        })()""")
        png = browser.screenshot(full_page=True)
        errors = list(browser.errors)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    cut = marks["plots"] or image.height
    parts = [image.crop((0, 0, image.width, min(cut, image.height)))]
    if marks["gallery"] is not None:
        start = marks["gallery"] - 10
        parts.append(image.crop((0, start, image.width, min(image.height, start + GALLERY_HEIGHT))))
    sheet = Image.new("RGB", (image.width, sum(p.height for p in parts) + 6 * (len(parts) - 1)), (200, 204, 214))
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height + 6
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
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
    p.add_argument("--screenshot", metavar="PNG", help="also open the page in headless Chromium and save an overview "
                                                       "PNG: summary and tables, then the first gallery rows (needs "
                                                       "the chromium package)")
    p.add_argument("--screenshot-width", type=int, default=1000, metavar="PX")
    p.set_defaults(handler=_report)
