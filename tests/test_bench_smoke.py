"""The bench's machinery on a tiny CNN: contenders agree before timing, are timed alternated, and are reported as
a Markdown table, JSON with ratios from the medians, and a PNG chart. Sizes are tiny; the numbers are not the point.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradcam_engine.engine import contract as C
from gradcam_engine.export.gate import THRESHOLDS
from gradcam_engine.export.parity import TOLERANCES
from engine_support import lively, tiny_cnn_file

BATCH_SIZES = (1, 4)
DATASET_SIZES = (8, 16)
CAM_TOLERANCE = TOLERANCES["fp32"]["cam_max_abs_diff"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gradcam_engine.bench.main import preset, run_bench
    from gradcam_engine.bench.report.markdown import markdown

    tmp = tmp_path_factory.mktemp("bench")
    model = tiny_cnn_file(tmp / "tiny.keras", "gap", 5)
    config = preset(quick=True, model=str(model), preprocess="tf", batch_sizes=BATCH_SIZES,
                    images=8, reference_images=4, reps=5, e2e_images=8, e2e_batch_size=4,
                    dataset_sizes=DATASET_SIZES, work_dir=str(tmp / "work"), json_path=str(tmp / "bench.json"),
                    plot_path=str(tmp / "bench.png"), memory=False)  # memory: one fresh process, tested below
    report = run_bench(config)
    return {"report": report, "json": json.loads(Path(config.json_path).read_text()), "markdown": markdown(report),
            "png": Path(config.plot_path), "config": config}


def test_every_contender_agrees_with_the_reference_before_it_is_timed(bench_run: dict[str, Any]) -> None:
    checks = {c["contender"]: c for c in bench_run["json"]["checks"]}
    fused = [c for name, c in checks.items() if name.startswith("gradcam ")]
    assert {"gradcam onnx-cpu", "gradcam tf-cpu", "gradcam onnx-cpu int8"} <= {c["contender"] for c in fused}
    for c in fused:
        assert c["against"] == "reference tf-eager-cpu" and c["ok"]
        if not c["contender"].endswith(("int8", "bf16")):  # fp32: the contract; reduced precisions: the gate
            assert c["cam_max_abs_diff"] <= CAM_TOLERANCE and c["target_class_mismatches"] == 0
        else:  # close (the gate of its precision), and not fp32 in disguise
            limits = THRESHOLDS[c["contender"].rsplit(" ", 1)[1]]
            assert c["cam_corr_mean"] >= limits.cam_corr_mean and c["cam_max_abs_diff"] > CAM_TOLERANCE
    # Not a contract tolerance: end to end runs the very graph model-only runs; only batching's rounding differs.
    assert checks["end-to-end (JPEG -> Parquet)"]["cam_max_abs_diff"] < 1e-5


def test_reference_and_onnx_cams_agree_on_the_benchmarked_images(bench_run: dict[str, Any]) -> None:
    import keras
    import onnxruntime as ort

    from gradcam_engine.bench.measure.agreement import mixed_targets
    from gradcam_engine.bench.measure.images import scene_images
    from gradcam_engine.bench.contenders.reference import gradcam_reference, split_for_reference
    from gradcam_engine.engine import contract as C

    report, config = bench_run["report"], bench_run["config"]
    artifact = Path(report["model"]["artifact"])
    images = scene_images(config.images, (32, 32), config.seed + 1)[:config.reference_images]
    session = ort.InferenceSession(str(artifact / C.ONNX_FILE), providers=["CPUExecutionProvider"])
    top1 = session.run([C.PREDICTIONS], {C.IMAGES: images, C.CLASS_INDEX: np.full(len(images), -1, np.int32)})[0]
    class_index = mixed_targets(top1.argmax(-1), 3)
    fused = dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS),
                                                   {C.IMAGES: images, C.CLASS_INDEX: class_index})))
    model = keras.models.load_model(report["model"]["keras"], compile=False)
    reference = gradcam_reference(images, class_index, split_for_reference(model, "last_conv", "tf"))
    assert (class_index >= 0).any() and (class_index == -1).any()
    np.testing.assert_array_equal(reference["target_class"], fused[C.TARGET_CLASS])
    np.testing.assert_allclose(reference["cam"], fused[C.CAM], atol=CAM_TOLERANCE)
    alive = lively(reference["cam"])
    assert alive.all(), f"real maps, not flat ones that agree trivially: {alive.tolist()}"


def test_a_contender_with_different_cams_fails_the_check() -> None:
    from gradcam_engine.bench.measure.agreement import compare
    from gradcam_engine.engine import contract as C

    cam = np.random.default_rng(0).uniform(0, 1, (2, 4, 4)).astype(np.float32)
    expected = {C.PREDICTIONS: np.array([[0.2, 0.8], [0.6, 0.4]]), C.TARGET_CLASS: np.array([1, 0]), C.CAM: cam}
    assert compare(expected, dict(expected))["ok"]
    assert not compare(expected, {**expected, C.CAM: cam[:, ::-1]})["ok"]
    assert not compare(expected, {**expected, C.TARGET_CLASS: np.array([0, 0])})["ok"]


def test_the_reference_contender_builds_again_once_its_module_is_imported(bench_run: dict[str, Any]) -> None:
    """Importing bench.contenders.reference (as the tests and any user of the reference do) must not shadow the
    builder of the reference contender: a second bench in one process, or one after that import, needs it again."""
    import gradcam_engine.bench.contenders.reference  # noqa: F401
    from gradcam_engine.bench.contenders import REFERENCE, Sources, Spec, make

    model = bench_run["report"]["model"]
    contender = make(Spec(REFERENCE, "reference"), Sources(model["artifact"], model["keras"], model["preprocessing"],
                                                           None))
    images = np.zeros((1, 32, 32, 3), np.uint8)
    assert contender.kind == REFERENCE and contender.call(images, np.full(1, -1, np.int32))["cam"].shape == (1, 16, 16)


def test_a_contenders_memory_is_measured_alone_in_a_fresh_process(bench_run: dict[str, Any]) -> None:
    from dataclasses import asdict

    from gradcam_engine.bench.contenders import GRADCAM, Sources, Spec
    from gradcam_engine.bench.measure.fresh import run_worker

    model = bench_run["report"]["model"]
    sources = Sources(model["artifact"], model["keras"], model["preprocessing"], None)
    result = run_worker("gradcam_engine.bench.measure.memory_worker",
                        [json.dumps(asdict(Spec(GRADCAM, "onnx"))), json.dumps(asdict(sources)), "--batch-size", "4",
                         "--size", "32", "32"])
    assert result["batch_size"] == 4
    assert 0 < result["baseline_rss_mb"] <= result["loaded_rss_mb"] <= result["peak_rss_mb"] < 2048


def test_json_has_every_contender_at_every_batch_size_with_the_machine(bench_run: dict[str, Any]) -> None:
    data = bench_run["json"]
    seen = {(r["contender"], r["batch_size"]) for r in data["results"]}
    for name in ("gradcam onnx-cpu", "forward onnx-cpu", "gradcam tf-cpu", "forward tf-cpu"):
        assert {(name, b) for b in BATCH_SIZES} <= seen
    assert ("reference tf-eager-cpu", 1) in seen
    assert {"end-to-end (JPEG -> Parquet)", "model-only (decoded arrays)"} <= {c for c, _ in seen}
    for r in data["results"]:
        assert r["repetitions"] == 5 and len(r["rep_seconds"]) == 5
        assert r["images_per_second_min"] <= r["images_per_second"] <= r["images_per_second_max"]
    machine = data["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["versions"]["onnxruntime"]
    assert "gpus" in machine


def test_ratios_are_computed_from_the_medians(bench_run: dict[str, Any]) -> None:
    rows = bench_run["json"]["results"]
    by = {(r["contender"], r["batch_size"]): r for r in rows}
    reference = by[("reference tf-eager-cpu", 1)]["images_per_second"]
    for r in rows:
        if r["kind"] != "gradcam":
            continue
        forward = by[(r["forward_pair"], r["batch_size"])]
        assert r["forward_pair"] == r["contender"].replace("gradcam", "forward")
        assert r["vs_forward"] == pytest.approx(r["images_per_second"] / forward["images_per_second"])
        assert r["vs_reference"] == pytest.approx(r["images_per_second"] / reference)
        assert r["images_per_second"] == pytest.approx(float(np.median([r["images"] / s for s in r["rep_seconds"]])))


def test_targets_state_value_goal_and_a_verdict_that_follows_from_them(bench_run: dict[str, Any]) -> None:
    from gradcam_engine.bench.report.markdown import (BF16_TARGET, END_TO_END_TARGET, INT8_END_TO_END_TARGET,
                                                      INT8_TARGET, MEMORY_GROWTH_TARGET, METHODS_TARGET,
                                                      SPEEDUP_TARGET, TAX_TARGET)
    from gradcam_engine.engine.cpu import native_bf16

    goals = {"best fused Grad-CAM": SPEEDUP_TARGET, "Grad-CAM / forward-only": TAX_TARGET,
             "end to end (JPEG": END_TO_END_TARGET, "int8 Grad-CAM": INT8_TARGET, "bf16 Grad-CAM": BF16_TARGET,
             "int8 end to end": INT8_END_TO_END_TARGET, "all CAM methods": METHODS_TARGET}
    targets = bench_run["json"]["targets"]
    assert len(targets) == len(goals) + 1
    for t in targets:
        if t["target"].startswith("end-to-end peak RSS"):
            memory = t
            continue
        goal = next(g for prefix, g in goals.items() if t["target"].startswith(prefix))
        if t["target"].startswith("bf16") and not native_bf16():  # bf16 is timed only where the CPU runs it natively
            assert t["measured"] is None and t["met"] is None
            continue
        assert t["measured"] is not None and t["goal"]
        assert t["met"] is (t["measured"] >= goal), t
    sweep = bench_run["json"]["dataset_sweep"]
    assert memory["measured"] == pytest.approx(sweep[-1]["peak_rss_mb"] / sweep[0]["peak_rss_mb"] - 1)
    assert memory["met"] is (memory["measured"] <= MEMORY_GROWTH_TARGET and sweep[-1]["peak_rss_mb"] < 2048)
    assert [r["images"] for r in sweep] == list(DATASET_SIZES)
    assert all(r["ok"] == r["images"] and r["peak_rss_mb"] > r["baseline_rss_mb"] > 0 for r in sweep)


def _report(reference: float, gradcam: float, forward: float, e2e: float, model_only: float,
            rss_mb: tuple[float, float]) -> dict[str, Any]:
    """A bench report with known figures: img/s of each contender and the peak RSS of the two dataset sizes."""
    def row(contender: str, kind: str, ips: float, group: str = "model", **extra: Any) -> dict[str, Any]:
        return {"contender": contender, "kind": kind, "group": group, "images_per_second": ips, "batch_size": 8,
                "images": 32, "runtime": "onnx-cpu", "precision": "fp32", **extra}
    return {"results": [row("reference tf-eager-cpu", "reference", reference),
                        row("gradcam onnx-cpu", "gradcam", gradcam, vs_forward=gradcam / forward,
                            forward_pair="forward onnx-cpu"),
                        row("forward onnx-cpu", "forward", forward),
                        row("end-to-end (JPEG -> Parquet)", "end-to-end", e2e, group="e2e"),
                        row("model-only (decoded arrays)", "model-only", model_only, group="e2e")],
            "dataset_sweep": [{"images": 200, "peak_rss_mb": rss_mb[0]}, {"images": 2000, "peak_rss_mb": rss_mb[1]}]}


@pytest.mark.parametrize(("figures", "verdicts"), [
    ((1.0, 20.0, 21.0, 17.0, 20.0, (500.0, 575.0)), [True, True, True, True]),       # each exactly at its goal
    ((1.0, 19.9, 21.0, 16.9, 20.0, (500.0, 576.0)), [False, False, False, False]),   # each just short of it
    ((1.0, 30.0, 30.0, 20.0, 20.0, (1900.0, 2100.0)), [True, True, True, False]),    # flat, but over 2 GB
], ids=["at_the_goals", "just_short", "over_the_memory_limit"])
def test_verdicts_on_known_figures(figures: tuple, verdicts: list[bool]) -> None:
    from gradcam_engine.bench.report.markdown import targets

    got = {t["target"]: t for t in targets(_report(*figures))}
    judged = [next(t for name, t in got.items() if name.startswith(prefix)) for prefix in
              ("best fused Grad-CAM", "Grad-CAM / forward-only", "end to end (JPEG", "end-to-end peak RSS")]
    assert [t["met"] for t in judged] == verdicts, judged
    reference, gradcam, forward, e2e, model_only, (small, large) = figures
    assert [t["measured"] for t in judged] == pytest.approx([gradcam / reference, gradcam / forward,
                                                             e2e / model_only, large / small - 1])
    rest = [t for t in got.values() if t not in judged]  # no int8, bf16 or methods contender here: not measured
    assert len(rest) == 4 and all(t["measured"] is None and t["met"] is None for t in rest)


def test_markdown_has_a_row_per_timed_configuration_and_the_targets(bench_run: dict[str, Any]) -> None:
    text = bench_run["markdown"]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| contender")]
    for r in bench_run["json"]["results"]:
        assert any(line.startswith(f"| {r['contender']} |") and f"| {r['batch_size']} |" in line for line in rows)
    verdicts = [line for line in text.splitlines() if line.startswith(("- MET:", "- MISSED:"))]
    assert len(verdicts) == sum(t["met"] is not None for t in bench_run["json"]["targets"])
    assert "vs reference" in text and "vs forward-only" in text


def test_chart_is_a_png_with_real_content(bench_run: dict[str, Any]) -> None:
    from PIL import Image

    png = bench_run["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 800 and img.height >= 500
        pixels = np.asarray(img.convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 20                                  # bars, text, lines: not a blank canvas
    assert (pixels != 255).any(axis=-1).mean() > 0.03         # a real share of the canvas is drawn on


def test_int8_and_bf16_are_timed_beside_fp32_with_their_forward_pairs(bench_run: dict[str, Any]) -> None:
    from gradcam_engine.engine.cpu import native_bf16

    data = bench_run["json"]
    seen = {(r["contender"], r["precision"], r["batch_size"]) for r in data["results"]}
    wanted = [("gradcam onnx-cpu int8", "int8"), ("forward onnx-cpu int8", "int8"),
              ("end-to-end (JPEG -> Parquet) onnx-cpu int8", "int8")]
    wanted += [("gradcam tf-cpu bf16", "bf16"), ("forward tf-cpu bf16", "bf16"),
               ("end-to-end (JPEG -> Parquet) tf-cpu bf16", "bf16")] if native_bf16() else []
    for name, precision in wanted:
        assert any(c == name and p == precision for c, p, _ in seen), name
    int8 = [r for r in data["results"] if r["contender"] == "gradcam onnx-cpu int8"]
    assert all(r["forward_pair"] == "forward onnx-cpu int8" and r["vs_forward"] for r in int8)
    if not native_bf16():
        assert any("gradcam tf-cpu bf16" in s["contender"] and "avx512_bf16" in s["reason"] for s in data["skipped"])
    gate = data["precision_gate"]["results"][C.ONNX_INT8_FILE]
    assert gate["precision"] == "int8" and "calibration" in gate
    assert f"- {C.ONNX_INT8_FILE}: top-1 agreement" in bench_run["markdown"]
    features = data["machine"]["cpu_features"]
    assert {"avx512_vnni", "amx_int8", "avx512_bf16", "amx_bf16"} <= set(features)
    assert "CPU features" in bench_run["markdown"]
