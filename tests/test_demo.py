"""`gradcam demo` end to end, as the README's first command runs it: the shipped model classifies the demo's scenes
and its heatmaps point at the objects. Scored here from the files the demo writes, independently of the demo's own
scoring, and against bars below the figures it is known to reach (98.2% accuracy, pointing game 92.5%)."""
from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from gradcam_engine.cli.main import main
from gradcam_engine.demo.scenes import BOXES_CSV, CLASS_NAMES

IMAGES = 400  # the demo's default, seed 2026: the scenes its known figures were measured on
MIN_ACCURACY = 0.95
MIN_POINTING = 0.85


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--images", str(IMAGES)]) == 0
    return out, printed.getvalue()


def independent_scores(out: Path, results: Path) -> tuple[float, float, int]:
    """Accuracy and pointing game from the results and boxes.csv: the peak cell's centre, scaled to the image, inside
    the object's box."""
    truth = {}
    with open(out / "images" / BOXES_CSV, newline="") as fh:
        for row in csv.DictReader(fh):
            truth[(out / "images" / row["path"]).resolve()] = (int(row["label"]),
                                                               [int(row[k]) for k in ("x0", "y0", "x1", "y1")])
    correct = hits = 0
    rows = ds.dataset(str(results), format="parquet").to_table().to_pylist()
    for row in rows:
        assert row["status"] == "ok", row["error"]
        label, (x0, y0, x1, y1) = truth[Path(row["path"]).resolve()]
        correct += row["predicted_class"] == label and row["predicted_label"] == CLASS_NAMES[label]
        cam = np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"])
        r, c = np.unravel_index(int(cam.argmax()), cam.shape)
        x, y = (c + 0.5) * row["width"] / cam.shape[1], (r + 0.5) * row["height"] / cam.shape[0]
        hits += bool(cam.max() > 0 and x0 <= x < x1 and y0 <= y < y1)
    return correct / len(rows), hits / len(rows), len(rows)


def test_the_demo_classifies_the_scenes_and_its_heatmaps_point_at_the_objects(demo: tuple[Path, str]) -> None:
    out, printed = demo
    line = re.search(r"Demo: (\d+) synthetic scenes, classification accuracy ([\d.]+)%; pointing game .*? "
                     r"([\d.]+)% of all images", printed)
    assert line, printed
    results = re.search(r"Results: (\S+)/ \(Parquet\)", printed)
    assert results, printed
    accuracy, pointing, rows = independent_scores(out, Path(results.group(1)))
    assert (int(line.group(1)), rows) == (IMAGES, IMAGES)
    assert float(line.group(2)) == pytest.approx(100 * accuracy, abs=0.051)  # printed to 0.1%
    assert float(line.group(3)) == pytest.approx(100 * pointing, abs=0.051)
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.1%}"
    assert pointing >= MIN_POINTING, f"pointing game {pointing:.1%}"


def test_the_demo_writes_its_overlays_and_a_complete_run(demo: tuple[Path, str]) -> None:
    out, printed = demo
    overlays = re.search(r"Overlays: (\S+)/", printed)
    assert overlays, printed
    files = sorted(Path(overlays.group(1)).glob("*.jpg"))
    assert len(files) == 16 and all(f.stat().st_size > 1000 for f in files)
    run_json = re.search(r"summary (\S+run\.json)", printed)
    assert run_json, printed
    assert '"status": "complete"' in Path(run_json.group(1)).read_text()
