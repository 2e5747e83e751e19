"""The demo exports every CAM method and scores each one with the pointing game, from the run's own Parquet columns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from gradcam_engine.demo.scenes import pointing_hits, read_scene_files
from gradcam_engine.export.methods import method_names


def test_demo_prints_the_pointing_game_of_every_method(tmp_path: Path) -> None:
    from gradcam_engine.demo.run import run_demo

    report = run_demo(tmp_path, images=24, overlays=2)
    assert list(report.pointing_by_method) == list(method_names())
    truth = {str(p): box for p, _, box in read_scene_files(tmp_path / "images")}
    rows = [r for r in ds.dataset(tmp_path / "run" / "results", format="parquet").to_table().to_pylist()]
    boxes = np.array([truth[str(Path(r["path"]).resolve())] for r in rows])
    sizes = np.array([(r["width"], r["height"]) for r in rows])
    text = report.text()
    for method, (everything, _) in report.pointing_by_method.items():
        cams = np.stack([np.reshape(r[f"cam_{method}"], (r["cam_height"], r["cam_width"])) for r in rows])
        assert everything == float(pointing_hits(cams, boxes, sizes).mean()), method
        assert f"\n  {method:<10} {everything:6.1%}" in text
    assert report.pointing_by_method["gradcam"][0] == report.pointing_game  # the headline is the first method
    assert report.accuracy > 0.8 and min(p for p, _ in report.pointing_by_method.values()) > 0.5  # real maps
