"""The evaluate speed tool builds runs the engine reads as its own, with one CAM column per method, and times them:
a broken tool would leave the README's figures unreproducible. Only that it works is checked here; its timings are
quoted in the README, never asserted."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from gradcam_engine.bench.tools.evaluate_speed import bench_boxes, synthetic_run
from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate


def test_synthetic_runs_hold_one_cam_column_per_method_and_evaluate_scores_each(tmp_path: Path) -> None:
    run_dir, labels, boxes = synthetic_run(tmp_path, 300, (224, 224), (14, 14), "smooth", shard=128, methods=3)
    assert json.loads((run_dir / "run.json").read_text())["methods"] == ["gradcam", "m1", "m2"]
    summary = evaluate(EvaluateConfig(str(run_dir), labels=str(labels), boxes=str(boxes), progress=False))
    assert summary.evaluated == 300 and summary.info["methods"] == ["gradcam", "m1", "m2"]
    rows = ds.dataset(str(run_dir / "metrics"), format="parquet").to_table(columns=["path", "method",
                                                                                    "energy"]).to_pylist()
    assert len(rows) == 900 and len({(r["path"], r["method"]) for r in rows}) == 900
    energy = {m: sorted((r["path"], r["energy"]) for r in rows if r["method"] == m) for m in ("gradcam", "m1")}
    assert energy["gradcam"] != energy["m1"]  # each method its own maps


def test_the_boxes_benchmark_reports_each_shape_and_method_count(capsys: pytest.CaptureFixture[str]) -> None:
    bench_boxes(rows=64, repeat=1, workers=1, methods=(1, 2))
    lines = [line for line in capsys.readouterr().out.splitlines() if "rows/s" in line]
    assert len(lines) == 8 and sum("2 methods" in line for line in lines) == 4
