"""`report`: one self-contained page, opened in a real headless Chromium: it renders, every gallery image loads, the
page logs no error, and the class filter works. Chromium is part of the test environment (`.ci/run` installs the
Debian package): without it these tests fail and say so; they never skip."""
from __future__ import annotations

import base64
import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions
from gradcam_engine.report import write_report
from gradcam_engine.report.browser import Chromium, page_images
from engine_support import (CLASS_NAMES, SmallArtifact, add_method, artifact, rows_by_path,  # noqa: F401 (fixture)
                            scene, write_image)

CPU = SessionOptions(backend="onnx", device="cpu", threads=1)
WIDTH, HEIGHT = 1280, 1600


@dataclass
class Runs:
    evaluated: Path     # labels, boxes and faithfulness; overlays for the first 3 images; one error row
    plain: Path         # the same inputs, never evaluated, no overlays
    boxes: Path         # the boxes CSV `evaluated` was evaluated with


@pytest.fixture(scope="module")
def runs(artifact: SmallArtifact, tmp_path_factory: pytest.TempPathFactory) -> Runs:  # noqa: F811
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    for i in range(12):
        write_image(images / CLASS_NAMES[i % 3] / f"img_{i:02d}.jpg", scene(60 + 7 * i, 50 + 3 * i, 70 + i))
    (images / "dog" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    evaluated, plain = root / "evaluated", root / "plain"
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(evaluated), session=CPU,
                          overlays="3", progress=False))
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(plain), session=CPU,
                          progress=False))
    boxes = root / "boxes.csv"
    with open(boxes, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "x0", "y0", "x1", "y1"])
        for path, row in rows_by_path(evaluated).items():
            if row["status"] == "ok":
                writer.writerow([path, 5, 5, row["width"] // 2, row["height"] // 2])
    evaluate(EvaluateConfig(str(evaluated), labels_from_folders=True, boxes=str(boxes), session=CPU, steps=2,
                            faithfulness=("drop", "deletion", "insertion"), progress=False))
    return Runs(evaluated=evaluated, plain=plain, boxes=boxes)


def rendered(page: Path) -> tuple[bytes, list[dict], list[str], Chromium]:
    """Open the page; return its screenshot, its images once decoded, and the errors it logged."""
    with Chromium(width=WIDTH, height=HEIGHT) as browser:
        browser.open(page)
        images = page_images(browser)
        shot = browser.screenshot()
        return shot, images, list(browser.errors), browser


def test_the_report_renders_in_chromium_with_every_image_loaded_and_no_error(runs: Runs, tmp_path: Path) -> None:
    summary = write_report(runs.evaluated, tmp_path / "report.html")
    html = summary.path.read_text()
    with Chromium(width=WIDTH, height=HEIGHT) as browser:
        browser.open(summary.path)
        images = page_images(browser)
        shot = browser.screenshot()
        cards = browser.evaluate("document.querySelectorAll('.card').length")
        # The class filter: choose a class some cards have and others not; only the cards predicted or labelled
        # as it stay visible, and each section's counter says how many.
        visible = browser.evaluate("""(function () {
            var select = document.getElementById('class-filter');
            var cards = Array.from(document.querySelectorAll('.card'));
            function having(name) {
                return cards.filter(function (c) {
                    return JSON.parse(c.getAttribute('data-classes')).indexOf(name) >= 0; }).length;
            }
            var name = Array.from(select.options).map(function (o) { return o.value; }).filter(function (v) {
                return v && having(v) > 0 && having(v) < cards.length; })[0];
            select.value = name;
            select.dispatchEvent(new Event('change'));
            return {name: name, shown: cards.filter(function (c) { return !c.hidden; }).length, having: having(name),
                    counters: Array.from(document.querySelectorAll('.shown')).map(function (s) {
                        return Number(s.textContent); })};
        })()""")
        errors = list(browser.errors)

    assert errors == [], errors
    gallery = [i for i in images if i["alt"].startswith("gradcam overlay of ")]
    assert len(gallery) == cards > summary.cards > 0  # an image may show in several sections, rendered once
    broken = [i["alt"] for i in images if not i["complete"] or i["naturalWidth"] == 0]
    assert broken == [], broken
    assert visible["name"] and 0 < visible["shown"] == visible["having"] < cards, visible
    assert sum(visible["counters"]) == visible["shown"]

    screenshot = Image.open(io.BytesIO(shot)).convert("RGB")
    assert screenshot.size == (WIDTH, HEIGHT)
    pixels = np.asarray(screenshot)
    assert pixels.std() > 20, "the page looks blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables, plots and heatmaps, not a flat page
    for section in ("Run", "Evaluation", "Per class", "Plots", "Gallery", "Errors (1)"):
        assert f">{section}" in html
    assert "Misclassified" in html and "Worst localised" in html and "truncated.jpg" in html


def test_the_browser_checks_catch_a_broken_image_and_a_script_error(tmp_path: Path) -> None:
    """The checks above can fail: a page with an undecodable image and an error in its script is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,iVBORw0KGgo=">'
                    "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    _, images, errors, _ = rendered(page)
    assert [i["naturalWidth"] for i in images] == [0]
    assert any("boom" in e for e in errors) and any("undefinedFunction" in e for e in errors)


def test_the_report_is_one_file_that_fetches_nothing(runs: Runs, tmp_path: Path) -> None:
    page = write_report(runs.evaluated, tmp_path / "r.html").path
    html = page.read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(link.startswith(("data:", "#")) for link in links), [l[:40] for l in links
                                                                               if not l.startswith("data:")]
    assert "default-src 'none'" in html  # the browser itself refuses any request the page might make
    assert list(tmp_path.iterdir()) == [page]


def test_gallery_thumbnails_reuse_the_runs_overlays_or_are_rendered(runs: Runs, tmp_path: Path) -> None:
    with_overlays = write_report(runs.evaluated, tmp_path / "a.html")
    assert with_overlays.reused_overlays >= 1  # the run wrote overlays for its first 3 inputs
    assert with_overlays.reused_overlays + with_overlays.rendered == with_overlays.cards
    without = write_report(runs.plain, tmp_path / "b.html", gallery=2)
    assert without.reused_overlays == 0 and without.rendered == without.cards
    html = (tmp_path / "b.html").read_text()
    assert html.count('class="card"') == without.cards <= 4  # two per section: most and least confident
    assert "Not evaluated" in html and "Misclassified" not in html


def test_a_report_shows_every_cam_method(runs: Runs, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs.plain, run_dir)
    add_method(run_dir, "mirror")
    summary = write_report(run_dir)
    html = summary.path.read_text()
    cards = html.count('class="card"')
    assert html.count('alt="mirror overlay of ') == html.count('alt="gradcam overlay of ') == cards > 0
    assert 'alt="peak density, mirror"' in html and "gradcam, mirror" in html


def test_an_unfinished_evaluation_is_named_not_shown_as_figures(runs: Runs, tmp_path: Path) -> None:
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs.evaluated, run_dir)
    info = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**info, "status": "running"}))
    html = write_report(run_dir).path.read_text()
    assert "An evaluation of this run did not finish" in html and "Per method" not in html
    card_figures = r'<div class="(good|bad)">label |<div>gradcam: (hit|miss|drop|del) '  # a gallery card's scores
    assert not re.search(card_figures, html)
    assert re.search(card_figures, write_report(runs.evaluated, tmp_path / "done.html").path.read_text())


def test_a_runs_overlay_is_reused_for_the_thumbnail(tmp_path: Path) -> None:
    """The run's overlay, named by engine.overlay.overlay_name, is reused at the input's size (the input itself is
    gone, so a thumbnail can only come from the overlay); one of another size is not this input's."""
    from gradcam_engine.engine.inputs import InputItem
    from gradcam_engine.engine.overlay import overlay_name
    from gradcam_engine.report.images import Thumbnails

    path = str(tmp_path / "gone" / "cat.jpg")
    folder = tmp_path / "overlays"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / overlay_name(path))
    Image.new("RGB", (64, 48), (10, 200, 10)).save(folder / "cat.jpg")  # a name of another scheme is not used
    thumbnails = Thumbnails(folder, "gradcam", lambda p: InputItem(p, "file"))
    uris = thumbnails.overlays(path, 64, 48, {"gradcam": np.zeros((4, 4), np.float32)}, None)
    assert list(uris) == ["gradcam"] and thumbnails.reused == 1
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris["gradcam"].split(",", 1)[1]))).convert("RGB"))
    assert np.abs(shown.astype(int).mean(axis=(0, 1)) - (200, 10, 10)).max() < 12  # the overlay, not cat.jpg
    assert thumbnails.overlays(path, 65, 48, {"gradcam": np.zeros((4, 4), np.float32)}, None) == {}  # other size


SIX_METHODS = ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam"]


def with_methods(source: Path, dest: Path, methods: list[str]) -> Path:
    """A copy of a run as a run with several CAM methods looks: one `cam_<method>` column for each after the first."""
    import json
    import shutil

    shutil.copytree(source, dest)
    for method in methods[1:]:
        add_method(dest, method)
    info = json.loads((dest / "run.json").read_text())
    (dest / "run.json").write_text(json.dumps({**info, "methods": methods}))
    return dest


def test_the_report_shows_every_plot_and_the_runs_facts(runs: Runs, tmp_path: Path) -> None:
    import json

    html = write_report(runs.evaluated, tmp_path / "r.html").path.read_text()
    info = json.loads((runs.evaluated / "run.json").read_text())
    facts = dict((label, value) for value, label in re.findall(r'<div class="fact"><b>([^<]*)</b><span>([^<]*)</span>',
                                                               html))
    assert facts["precision"] == info["precision"] == "fp32"
    assert facts["CAM methods"] == "gradcam"
    assert facts[f"throughput ({info['throughput']['seconds']:.1f} s, last session of the run)"] == \
        f"{info['throughput']['images_per_second']:.1f} img/s"
    titles = re.findall(r'<svg class="plot"[^>]*><title>([^<]*)</title>', html)
    assert titles == ["Confidence of the predicted class", "gradcam: energy inside boxes",
                      "gradcam: IoU@0.5 with boxes", "gradcam: drop in confidence", "gradcam: deletion AUC",
                      "gradcam: insertion AUC",
                      "gradcam: mean target score as pixels are deleted / inserted", "gradcam: pointing game per class"]
    predicted = {r["predicted_label"] for r in rows_by_path(runs.evaluated).values() if r["status"] == "ok"}
    assert len(predicted) > 1
    assert set(re.findall(r'alt="mean gradcam CAM, ([^"]*)"', html)) == predicted  # one map per predicted class

    with Chromium(width=WIDTH, height=HEIGHT) as browser:
        browser.open(tmp_path / "r.html")
        drawn = browser.evaluate("""Array.from(document.querySelectorAll('svg.plot')).map(function (s) {
            var box = s.getBoundingClientRect();
            return {title: s.querySelector('title').textContent, width: box.width, height: box.height,
                    marks: s.querySelectorAll('rect, polyline').length};
        })""")
        maps = browser.evaluate("""Array.from(document.querySelectorAll('img[alt^="mean gradcam CAM"]')).map(
            function (i) { return i.complete ? i.naturalWidth : 0; })""")
    assert [d["title"] for d in drawn] == titles
    assert all(d["width"] >= 300 and d["height"] >= 150 and d["marks"] > 0 for d in drawn), drawn
    assert len(maps) == len(predicted) and min(maps) > 0


def test_wide_tables_scroll_in_their_own_box_and_the_page_never_sideways(runs: Runs, tmp_path: Path) -> None:
    """Six CAM methods make the per-class table wider than the page's column at the README screenshot's width."""
    run_dir = with_methods(runs.evaluated, tmp_path / "run", SIX_METHODS)
    evaluate(EvaluateConfig(str(run_dir), labels_from_folders=True, boxes=str(runs.boxes), overwrite=True,
                            progress=False))
    page = write_report(run_dir).path
    with Chromium(width=1000, height=1000) as browser:
        browser.open(page)
        layout = browser.evaluate("""(function () {
            var boxes = Array.from(document.querySelectorAll('.scroll'));
            return {page: document.documentElement.scrollWidth, window: window.innerWidth,
                    tables: document.querySelectorAll('table').length,
                    boxed: document.querySelectorAll('.scroll > table').length,
                    scrolling: boxes.filter(function (b) { return b.scrollWidth > b.clientWidth; }).map(
                        function (b) { return b.previousElementSibling.textContent; })};
        })()""")
        errors = list(browser.errors)
    assert errors == []
    assert layout["page"] <= layout["window"] == 1000, layout
    assert layout["boxed"] == layout["tables"] >= 3, layout  # per method, per class, confusion matrix, errors
    assert "Per class" in layout["scrolling"], layout  # wider than the column: it scrolls inside its box


def test_report_screenshot_writes_a_png_of_the_asked_width_that_is_not_blank(runs: Runs, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    from gradcam_engine.cli.main import main

    png = tmp_path / "shot.png"
    assert main(["report", str(runs.evaluated), "--out", str(tmp_path / "r.html"), "--screenshot", str(png),
                 "--screenshot-width", "900"]) == 0
    assert f"Screenshot: {png}" in capsys.readouterr().out
    shot = Image.open(png)
    assert shot.format == "PNG" and shot.width == 900 and shot.height > 600
    pixels = np.asarray(shot.convert("RGB"))
    assert pixels.std() > 20, "the screenshot looks blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and heatmaps, not a flat page
    rows = pixels.reshape(pixels.shape[0], -1).std(axis=1)
    assert (rows > 5).mean() > 0.3  # content all the way down, not one band at the top
