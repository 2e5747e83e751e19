"""The demo ends with evaluate and report: its figures are evaluate's, and evaluate reproduces the pointing game the
demo's own scoring (demo.scenes.pointing_hits over the scenes' ground truth) gives."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from gradcam_engine.demo.run import run_demo
from gradcam_engine.demo.scenes import CLASS_NAMES, pointing_hits, read_scene_files


def test_the_demo_reports_evaluates_figures_and_they_match_its_own_scoring(tmp_path: Path) -> None:
    report = run_demo(tmp_path, images=200, overlays=4)

    truth = {str(p): (label, box) for p, label, box in read_scene_files(tmp_path / "images")}
    rows = [r for r in ds.dataset(str(tmp_path / "run" / "results")).to_table().to_pylist() if r["status"] == "ok"]
    assert len(rows) == 200
    cams = np.stack([np.asarray(r["cam"], np.float32).reshape(r["cam_height"], r["cam_width"]) for r in rows])
    boxes = np.array([truth[r["path"]][1] for r in rows])
    sizes = np.array([(r["width"], r["height"]) for r in rows])
    hits = pointing_hits(cams, boxes, sizes)
    correct = np.array([r["predicted_class"] == truth[r["path"]][0] for r in rows])
    assert 0.5 < hits.mean() < 1.0  # a real score, neither trivial nor broken
    assert report.pointing_game == hits.mean()
    assert report.pointing_game_correct == hits[correct].mean()
    assert report.accuracy == correct.mean()

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["overall"]["gradcam"]["pointing_game"] == hits.mean()
    assert metrics["counts"]["labelled"] == metrics["counts"]["with_boxes"] == 200
    for key in ("energy_pointing_game", "iou", "average_drop", "increase_in_confidence", "deletion_auc",
                "insertion_auc"):
        assert metrics["overall"]["gradcam"][key] is not None, key
    with open(tmp_path / "images" / "labels.csv", newline="") as fh:
        labels = list(csv.DictReader(fh))
    assert {row["label"] for row in labels} <= set(CLASS_NAMES) and len(labels) == 200

    text = report.text()
    assert re.search(r"Demo: 200 synthetic scenes, classification accuracy \d+\.\d%; pointing game \(CAM peak inside "
                     r"the object's box\) \d+\.\d% of all images, \d+\.\d% of correctly classified ones\.", text)
    assert f"Report: {tmp_path / 'run' / 'report.html'}" in text
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
