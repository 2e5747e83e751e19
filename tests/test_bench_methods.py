"""What every CAM method costs is measured: `gradcam bench` times one graph with all of them against Grad-CAM alone,
after checking each method's map against its formula, and the GPU check's dry run reports the same pair. Tiny sizes:
the machinery is under test, not the numbers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from gradcam_engine.engine import contract as C
from gradcam_engine.export.methods import method_names
from engine_support import tiny_cnn_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cnn_file(tmp_path_factory.mktemp("bench_methods") / "tiny.keras", "flatten", 6)


@pytest.fixture(scope="module")
def report(tiny: Path) -> dict[str, Any]:
    from gradcam_engine.bench.main import preset, run_bench

    config = preset(quick=True, model=str(tiny), preprocess="tf", backends=("reference", "onnx", "tf"),
                    batch_sizes=(4,), images=8, reference_images=4, reps=5, dataset_sizes=(),
                    work_dir=str(tiny.parent / "work"), memory=False, methods=("layercam", "eigencam", "gradcampp"))
    return run_bench(config)


def test_all_methods_contenders_match_every_formula_before_they_are_timed(report: dict[str, Any]) -> None:
    checks = {c["contender"]: c for c in report["checks"]}
    for runtime in ("onnx-cpu", "tf-cpu"):
        check = checks[f"methods {runtime}"]
        assert check["ok"] and check["against"] == "reference tf-eager-cpu"
        assert check["cams_max_abs_diff"] <= 1e-4 and check["cam_max_abs_diff"] <= 1e-4
    assert report["model"]["methods"] == ["gradcam", "layercam", "eigencam", "gradcampp"]  # Grad-CAM first


def test_all_methods_are_timed_against_gradcam_alone_round_by_round(report: dict[str, Any]) -> None:
    rows = {(r["contender"], r["batch_size"]): r for r in report["results"]}
    for runtime in ("onnx-cpu", "tf-cpu"):
        many, alone = rows[(f"methods {runtime}", 4)], rows[(f"gradcam {runtime}", 4)]
        assert many["gradcam_pair"] == alone["contender"] and len(many["rep_seconds"]) == 5
        per_round = [a / m for a, m in zip(alone["rep_seconds"], many["rep_seconds"])]
        assert many["vs_gradcam"] == pytest.approx(float(np.median(per_round)))
        cpu = [a / m for a, m in zip(alone["rep_cpu_seconds"], many["rep_cpu_seconds"])]
        assert len(cpu) == 5 and many["vs_gradcam_cpu"] == pytest.approx(float(np.median(cpu)))
        assert many["forward_pair"] == f"forward {runtime}" and many["vs_forward"] > 0


def test_the_methods_target_and_row_are_reported(report: dict[str, Any]) -> None:
    from gradcam_engine.bench.report.markdown import markdown

    (target,) = [t for t in report["targets"] if t["target"].startswith("all CAM methods")]
    onnx = next(r for r in report["results"] if r["contender"] == "methods onnx-cpu")
    assert target["measured"] == onnx["vs_gradcam"] and target["met"] == (onnx["vs_gradcam"] >= 0.95)
    text = markdown(report)
    assert "| methods onnx-cpu | fp32 | 4 |" in text and "gradcam, layercam, eigencam, gradcampp" in text
    assert "all CAM methods / Grad-CAM alone" in text


def test_gradcam_alone_builds_no_methods_contender(tiny: Path) -> None:
    from gradcam_engine.bench.contenders import METHODS
    from gradcam_engine.bench.main import contender_specs, preset

    class Plain:
        def has(self, name: str) -> bool:
            return False

    kinds = {s.kind for s in contender_specs(preset(quick=True, methods=("gradcam",)), Plain(), True)}
    assert METHODS not in kinds
    assert METHODS in {s.kind for s in contender_specs(preset(quick=True), Plain(), True)}


def test_gpu_check_dry_run_times_and_checks_every_method(tiny: Path, tmp_path: Path) -> None:
    from gradcam_engine.bench.tools import gpu_check

    prepared = gpu_check.prepare(str(tiny), tmp_path / "prepared", "tf")
    assert gpu_check.prepared_methods(prepared) == method_names()
    out = tmp_path / "report.json"
    gpu_check.check(prepared, [2], dry_run=True, out_json=out)
    report = json.loads(out.read_text())
    for row in report["model_only"]:
        assert row["methods_img_s"] > 0
        assert row["methods_vs_gradcam"] == pytest.approx(row["methods_img_s"] / row["gradcam_img_s"])
    parity = report["fp16_parity"]
    assert parity["methods"] == list(method_names()) and parity["cams_max_abs_diff"] <= 0.05
    assert min(parity["cams_min_correlation"].values()) >= 0.99
    assert C.CAMS in {o.name for o in onnx.load(str(prepared / gpu_check.FUSED_METHODS)).graph.output}

