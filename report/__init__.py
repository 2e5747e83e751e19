"""`gradcam report`: one self-contained HTML page about a run directory, to look at rather than read.

    data.py     what the page shows, gathered with bounded work (results/, metrics/ when evaluated)
    images.py   gallery thumbnails (the run's overlays, or rendered) and small heatmaps, as data: URIs
    svg.py      the plots, as inline SVG
    page.py     the HTML, its styles and its few lines of script
    browser.py  headless Chromium over the DevTools pipe: a screenshot and what the page logged
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradcam_engine.engine.overlay import OVERLAY_DIR
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.run_view import RunView

DEFAULT_NAME = "report.html"
DEFAULT_GALLERY = 12


@dataclass
class ReportSummary:
    """What was written."""

    path: Path
    bytes: int
    cards: int
    reused_overlays: int
    rendered: int
    unreadable: int
    evaluated: bool

    def text(self) -> str:
        return (f"Report: {self.path} ({self.bytes / 1e6:.1f} MB; gallery of {self.cards} images, "
                f"{self.reused_overlays} from the run's overlays, {self.rendered} rendered"
                + (f", {self.unreadable} not readable" if self.unreadable else "")
                + ("" if self.evaluated else "; not evaluated: run `gradcam evaluate` for metrics") + ").")


def write_report(run_dir: str | Path, out: str | Path | None = None, gallery: int = DEFAULT_GALLERY) -> ReportSummary:
    """Gather the run, render thumbnails for the gallery, write the page atomically."""
    from gradcam_engine.report.data import gather
    from gradcam_engine.report.images import Thumbnails
    from gradcam_engine.report.page import render

    data = gather(run_dir, gallery)
    options = data.info.get("options") or {}
    thumbnails = Thumbnails(Path(run_dir) / OVERLAY_DIR, data.methods[0], RunView(run_dir).item,
                            int(options.get("max_bytes", RunConfig.max_bytes)),
                            int(options.get("max_pixels", RunConfig.max_pixels)))
    cards = {id(card): card for cards in data.sections.values() for card in cards}
    for card in cards.values():
        card.thumbnails = thumbnails.overlays(card.path, card.width, card.height, card.cams, card.boxes)
    target = Path(out) if out else Path(run_dir) / DEFAULT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(target)
    return ReportSummary(path=target, bytes=target.stat().st_size, cards=len(cards),
                         reused_overlays=thumbnails.reused, rendered=thumbnails.rendered,
                         unreadable=thumbnails.unreadable, evaluated=data.metrics is not None)
