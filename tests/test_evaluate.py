"""`evaluate` on a real run of the small exported CNN: ground truth matched by path, every metric row against the
metric functions applied to the results directly, faithfulness re-decoding the run's own inputs, resume after
SIGKILL, refusal of other options, several CAM methods, and no TensorFlow needed."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest

from gradcam_engine.engine.annotations import PathMatcher, parent_folder
from gradcam_engine.engine.errors import UserError
from gradcam_engine.engine.evaluate import EvaluateConfig, evaluate
from gradcam_engine.engine.faithfulness import masked_by_cam
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.metrics import box_scores
from gradcam_engine.engine.overlay import upsample
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import GradCAMSession, SessionOptions
from engine_support import (CLASS_NAMES, REPO, SmallArtifact, add_method, artifact, cam_of,  # noqa: F401 (fixture)
                            child_env, kill_at_first_shard, rows_by_path, run_python, scene, write_image)

SIZES = [(64, 64), (80, 60), (50, 90), (120, 100), (64, 48), (96, 96)] * 3
CPU = SessionOptions(backend="onnx", device="cpu", threads=1)


@dataclass
class Scenario:
    """A finished run over an ImageFolder tree, plus labels and boxes files for it."""

    root: Path
    images: Path
    run_dir: Path
    rows: dict[str, dict[str, Any]]
    labels_csv: Path
    boxes_csv: Path
    labels: dict[str, int]                 # results path -> class index, as the CSV says
    boxes: dict[str, list[list[float]]]    # results path -> boxes, as the CSV says

    def copy(self, dest: Path) -> Path:
        """The run directory, copied, so a test can evaluate it without touching the others'."""
        shutil.copytree(self.run_dir, dest)
        return dest


@pytest.fixture(scope="module")
def scenario(artifact: SmallArtifact, tmp_path_factory: pytest.TempPathFactory) -> Scenario:  # noqa: F811
    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    for i, (w, h) in enumerate(SIZES):
        write_image(images / CLASS_NAMES[i % 3] / f"img_{i:03d}.{'jpg' if i % 2 else 'png'}", scene(w, h, 40 + i))
    (images / "bird" / "broken.jpg").write_bytes(b"not an image at all")
    run_dir = root / "run"
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(run_dir), session=CPU,
                          batch_size=4, progress=False))
    rows = rows_by_path(run_dir)
    ok = sorted(p for p, r in rows.items() if r["status"] == "ok")
    assert len(ok) == 18 and len(rows) == 19

    # Labels next to the images, paths relative to that folder; a mix of names and indices; 3 images unlabelled,
    # one entry naming no input of the run.
    rng = np.random.default_rng(0)
    labels: dict[str, int] = {}
    labels_csv = images / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "note"])
        for i, path in enumerate(ok[:-3]):
            index = int(rng.integers(3))
            labels[path] = index
            writer.writerow([os.path.relpath(path, images), CLASS_NAMES[index] if i % 2 else index, "x"])
        writer.writerow(["cat/not_in_the_run.jpg", "cat", ""])
    # Boxes in another folder, paths relative to it; two boxes for some images, none for 4, one unmatched entry.
    boxes: dict[str, list[list[float]]] = {}
    boxes_csv = root / "truth" / "boxes.csv"
    boxes_csv.parent.mkdir()
    with open(boxes_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "x0", "y0", "x1", "y1"])
        for i, path in enumerate(ok[4:]):
            w, h = rows[path]["width"], rows[path]["height"]
            for _ in range(1 + i % 2):
                x0, y0 = rng.uniform(-5, w * 0.6), rng.uniform(-5, h * 0.6)
                box = [round(x0, 1), round(y0, 1), round(x0 + rng.uniform(5, w * 0.6), 1),
                       round(y0 + rng.uniform(5, h * 0.6), 1)]
                boxes.setdefault(path, []).append(box)
                writer.writerow([os.path.relpath(path, boxes_csv.parent), *box])
        writer.writerow(["../images/cat/missing.png", 1, 1, 5, 5])
    return Scenario(root, images, run_dir, rows, labels_csv, boxes_csv, labels, boxes)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    return ds.dataset(str(run_dir / "metrics"), format="parquet").to_table().to_pylist()


def metrics_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


# --- labels and boxes -------------------------------------------------------------------------------------------------

def test_every_row_and_figure_follows_from_the_results_and_the_ground_truth(scenario: Scenario,
                                                                            tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    summary = evaluate(EvaluateConfig(str(run_dir), labels=str(scenario.labels_csv), boxes=str(scenario.boxes_csv),
                                      progress=False))
    rows = {r["path"]: r for r in metrics_rows(run_dir)}
    assert set(rows) == set(scenario.rows) and summary.evaluated == 19  # one row per input, error rows included
    hits = []
    for path, result in scenario.rows.items():
        row = rows[path]
        assert row["method"] == "gradcam" and row["status"] == result["status"]
        label = scenario.labels.get(path)
        assert row["label"] == label
        assert row["label_name"] == (CLASS_NAMES[label] if label is not None else None)
        assert row["correct"] == (None if label is None or result["status"] != "ok"
                                  else result["predicted_class"] == label)
        truth = scenario.boxes.get(path)
        if truth is None or result["status"] != "ok":
            assert row["pointing_hit"] is row["energy"] is row["iou"] is None
            continue
        np.testing.assert_allclose(np.reshape(row["boxes"], (-1, 4)), truth, rtol=1e-6)
        expected = box_scores(cam_of(result)[None], np.array([[result["width"], result["height"]]]),
                              np.array(truth), np.zeros(len(truth), int))
        assert row["pointing_hit"] == bool(expected.hit[0])
        assert row["energy"] == pytest.approx(expected.energy[0], abs=1e-6)
        assert row["iou"] == pytest.approx(expected.iou[0], abs=1e-6)
        hits.append((row["pointing_hit"], label))

    figures = metrics_json(run_dir)
    assert figures["status"] == "complete"
    assert figures["counts"] == {"inputs": 19, "ok": 18, "error": 1, "labelled": 15, "unlabelled": 3,
                                 "with_boxes": 14, "without_boxes": 4, "faithfulness_errors": 0}
    assert figures["ground_truth"]["labels"]["unmatched"] == 1
    assert figures["ground_truth"]["boxes"]["unmatched"] == 1
    assert figures["ground_truth"]["boxes"]["boxes_beyond_image"] > 0  # some corners start at negative x or y
    labelled = [(r["predicted_class"], scenario.labels[p]) for p, r in scenario.rows.items() if p in scenario.labels]
    accuracy = np.mean([p == t for p, t in labelled])
    assert figures["classification"]["accuracy"] == pytest.approx(accuracy)
    matrix = np.zeros((3, 3), int)
    for p, t in labelled:
        matrix[t, p] += 1
    assert figures["classification"]["confusion_matrix"]["matrix"] == matrix.tolist()
    overall = figures["overall"]["gradcam"]
    assert overall["pointing_game"] == pytest.approx(np.mean([h for h, _ in hits]))
    assert overall["images_with_boxes"] == 14
    for index, name in enumerate(CLASS_NAMES):  # per class: by the label, over labelled inputs with boxes
        mine = [h for h, t in hits if t == index]
        got = figures["per_class"].get(name, {}).get("gradcam", {}).get("pointing_game")
        assert got == (pytest.approx(np.mean(mine)) if mine else None)
    assert "pointing game" in summary.text() and "accuracy" in summary.text()


def test_coco_boxes_give_the_same_rows_as_the_csv(scenario: Scenario, tmp_path: Path) -> None:
    """COCO file names relative to --root; one image's recorded size disagrees with the decoded one."""
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for n, (path, boxes) in enumerate(scenario.boxes.items()):
        row = scenario.rows[path]
        coco["images"].append({"id": n, "file_name": os.path.relpath(path, scenario.root),
                               "width": row["width"] + (n == 0), "height": row["height"]})
        for x0, y0, x1, y1 in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": n, "category_id": 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    coco_file = tmp_path / "annotations" / "instances.json"
    coco_file.parent.mkdir()
    coco_file.write_text(json.dumps(coco))
    from_csv = scenario.copy(tmp_path / "csv")
    from_coco = scenario.copy(tmp_path / "coco")
    evaluate(EvaluateConfig(str(from_csv), boxes=str(scenario.boxes_csv), progress=False))
    evaluate(EvaluateConfig(str(from_coco), boxes=str(coco_file), root=str(scenario.root), progress=False))
    columns = ["path", "boxes", "pointing_hit", "energy", "iou"]
    a = ds.dataset(str(from_csv / "metrics")).to_table(columns=columns).sort_by("path")
    b = ds.dataset(str(from_coco / "metrics")).to_table(columns=columns).sort_by("path")
    assert a.column("path").equals(b.column("path"))
    for name in columns[2:]:
        np.testing.assert_allclose(np.array(a.column(name).to_pylist(), float),
                                   np.array(b.column(name).to_pylist(), float), atol=1e-5)
    assert metrics_json(from_coco)["ground_truth"]["boxes"]["size_mismatch"] == 1


def test_labels_from_folders_are_the_parent_folder_names(scenario: Scenario, tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    evaluate(EvaluateConfig(str(run_dir), labels_from_folders=True, progress=False))
    for row in metrics_rows(run_dir):
        if row["status"] == "ok":
            assert row["label_name"] == Path(row["path"]).parent.name
    assert metrics_json(run_dir)["counts"]["labelled"] == 18


def test_paths_match_as_listed_or_relative_to_the_file_never_by_name_alone(tmp_path: Path) -> None:
    keys = [str(tmp_path / "a" / "x.jpg"), "rel/y.jpg", str(tmp_path / "s.tar") + "::cat/z.jpg", "s3://b/p/q.jpg"]
    matcher = PathMatcher(keys)
    base = str(tmp_path / "a")
    assert matcher.match(keys[0], "/elsewhere") == keys[0]
    assert matcher.match("x.jpg", base) == keys[0]
    assert matcher.match("./sub/../x.jpg", base) == keys[0]
    assert matcher.match(str(tmp_path / "a" / "." / "x.jpg"), "/elsewhere") == keys[0]
    assert matcher.match("x.jpg", str(tmp_path)) is None            # same name, other folder: no match
    assert matcher.match("rel/y.jpg", base) == "rel/y.jpg"          # exactly as in the results
    assert matcher.match(os.path.abspath("rel/y.jpg"), base) == "rel/y.jpg"
    assert matcher.match("../s.tar::cat/z.jpg", base) == keys[2]
    assert matcher.match("s3://b/p//q.jpg", base) == keys[3]
    assert parent_folder(keys[0]) == "a" and parent_folder(keys[2]) == "cat"
    assert parent_folder(str(tmp_path / "s.tar") + "::z.jpg") == "" and parent_folder(keys[3]) == "p"


@pytest.mark.parametrize(("files", "message"), [
    ({"labels.csv": "path,label\nnowhere/a.jpg,cat\n"}, "none of its 1 labels names an input of the run"),
    ({"labels.csv": "file,class\ncat/img_000.png,cat\n"}, "header with columns path,label"),
    ({"labels.csv": "path,label\ncat/img_000.png,zebra\n"}, "'zebra' (line 2)"),
    ({"labels.csv": "path,label\ncat/img_000.png,cat\ncat/img_000.png,dog\n"}, "line 3: cat/img_000.png is labelled "
                                                                             "again, differently"),
    ({"boxes.csv": "path,x0,y0,x1,y1\ncat/img_000.png,10,10,4,30\n"}, "line 2: x1 < x0 or y1 < y0"),
    ({"boxes.csv": "path,x0,y0,x1,y1\ncat/img_000.png,10,ten,4,30\n"}, "line 2: x0, y0, x1, y1 must be numbers"),
    ({"boxes.json": '{"images": [{"id": 1, "file_name": "cat/img_000.png"}], "annotations": [{"image_id": 1, '
                    '"bbox": [1, 2, -3, 4]}]}'}, "annotations[0]: bbox [1, 2, -3, 4]"),
], ids=["no-match", "no-header", "unknown-label", "two-labels", "swapped-corners", "not-a-number", "coco-negative"])
def test_unusable_ground_truth_is_one_clear_line_and_writes_nothing(scenario: Scenario, tmp_path: Path,
                                                                    files: dict[str, str], message: str) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    (name, text), = files.items()
    path = scenario.images / f"test_{name}"
    path.write_text(text)
    try:
        done = subprocess.run([sys.executable, "-m", "gradcam_engine.cli", "evaluate", str(run_dir),
                               "--labels" if name.startswith("labels") else "--boxes", str(path)],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    finally:
        path.unlink()
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "metrics").exists()


def test_labels_from_folders_refuses_folders_that_are_not_classes(artifact: SmallArtifact,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    write_image(tmp_path / "photos" / "zebra" / "a.png", scene(40, 40, 1))
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(tmp_path / "photos")], out=str(tmp_path / "run"),
                          session=CPU, progress=False))
    with pytest.raises(UserError, match="folder names: labels that are neither .*'zebra'"):
        evaluate(EvaluateConfig(str(tmp_path / "run"), labels_from_folders=True, progress=False))


# --- resume, refusal --------------------------------------------------------------------------------------------------

def test_a_second_evaluation_adds_nothing_and_other_options_are_refused_unless_overwriting(
        scenario: Scenario, tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    config = EvaluateConfig(str(run_dir), labels=str(scenario.labels_csv), boxes=str(scenario.boxes_csv),
                            progress=False)
    evaluate(config)
    shards = sorted((run_dir / "metrics").glob("part-*.parquet"))
    again = evaluate(config)
    assert again.evaluated == 0 and again.already_done == 19
    assert sorted((run_dir / "metrics").glob("part-*.parquet")) == shards
    with pytest.raises(UserError, match="different boxes; evaluate with the same options to resume, or add "
                                        "--overwrite"):
        evaluate(EvaluateConfig(str(run_dir), labels=str(scenario.labels_csv), progress=False))
    replaced = evaluate(EvaluateConfig(str(run_dir), labels=str(scenario.labels_csv), overwrite=True,
                                       progress=False))
    assert replaced.evaluated == 19 and "pointing_game" not in replaced.info["overall"]["gradcam"]
    assert len(metrics_rows(run_dir)) == 19


def test_a_run_redone_since_is_refused_and_a_run_grown_since_is_scored_for_its_new_rows(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    images = tmp_path / "images"
    for i in range(4):
        write_image(images / f"a_{i}.png", scene(48, 40, i))
    config = RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(tmp_path / "run"), session=CPU,
                       shard_size=2, progress=False)
    run_gradcam(config)
    evaluate(EvaluateConfig(config.out, labels_from_folders=False, progress=False))
    for i in range(4, 7):  # more images in the folder: the resumed run adds their rows in new shards
        write_image(images / f"b_{i}.png", scene(48, 40, i))
    run_gradcam(config)
    grown = evaluate(EvaluateConfig(config.out, progress=False))
    assert (grown.evaluated, grown.already_done) == (3, 4)
    assert sorted(r["path"] for r in metrics_rows(Path(config.out))) == sorted(str(p) for p in images.iterdir())
    run_gradcam(RunConfig(**{**config.__dict__, "overwrite": True}))  # redone: every shard rewritten
    with pytest.raises(UserError, match="the results changed since they were evaluated"):
        evaluate(EvaluateConfig(config.out, progress=False))


def test_an_evaluation_killed_mid_way_resumes_with_one_row_per_input_and_method(scenario: Scenario,
                                                                                 tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    metrics = run_dir / "metrics"
    args = ["--labels", str(scenario.labels_csv), "--boxes", str(scenario.boxes_csv), "--faithfulness",
            "drop,deletion,insertion", "--steps", "12", "--device", "cpu", "--threads", "1", "--batch-size", "1",
            "--workers", "1"]
    kill_at_first_shard(["evaluate", str(run_dir), *args, "--shard-size", "2"], metrics, timeout=120)
    assert metrics_json(run_dir)["status"] == "running"
    committed = len(metrics_rows(run_dir))
    assert 0 < committed < 19
    (metrics / ".part-00000000000000000001-deadbeef.parquet.tmp").write_bytes(b"PAR1 half written")

    from gradcam_engine.cli.main import main

    assert main(["evaluate", str(run_dir), *args, "--shard-size", "2"]) == 0
    rows = metrics_rows(run_dir)
    assert sorted(r["path"] for r in rows) == sorted(scenario.rows)  # each input once: no duplicate, no gap
    assert not list(metrics.glob(".*.tmp"))
    assert metrics_json(run_dir)["status"] == "complete"

    clean = scenario.copy(tmp_path / "clean")
    assert main(["evaluate", str(clean), *args]) == 0
    resumed = {r["path"]: r for r in rows}
    for row in metrics_rows(clean):
        for name in ("pointing_hit", "energy", "iou", "score", "drop", "deletion_auc", "insertion_auc"):
            assert resumed[row["path"]][name] == pytest.approx(row[name], abs=1e-5), name
    a, b = metrics_json(run_dir), metrics_json(clean)
    assert a["overall"]["gradcam"]["deletion_auc"] == pytest.approx(b["overall"]["gradcam"]["deletion_auc"])


# --- faithfulness -----------------------------------------------------------------------------------------------------

def test_faithfulness_re_decodes_the_run_s_own_inputs_and_scores_them_through_the_artifact(
        scenario: Scenario, artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    run_dir = scenario.copy(tmp_path / "run")
    changed = sorted(p for p, r in scenario.rows.items() if r["status"] == "ok")[0]
    backup = Path(changed).read_bytes()
    summary = evaluate(EvaluateConfig(str(run_dir), faithfulness=("drop", "deletion", "insertion"), steps=3,
                                      baseline="mean", session=CPU, progress=False))
    assert summary.info["counts"]["faithfulness_errors"] == 0
    probe = summary.info["faithfulness_probe"]
    assert (probe["backend"], probe["precision"], probe["run_precision"]) == ("onnx", "fp32", "fp32")
    session = GradCAMSession(artifact.root, CPU)
    rows = {r["path"]: r for r in metrics_rows(run_dir)}
    checked = 0
    for path, result in scenario.rows.items():
        row = rows[path]
        if result["status"] != "ok":
            assert row["score"] is None and row["deletion_curve"] is None
            continue
        # The run explained its top-1 class, so the target's predictions value on the re-decoded image is the run's
        # own predicted_score: the image was read back exactly as the run read it.
        assert row["score"] == pytest.approx(result["predicted_score"], abs=1e-5)
        curve_d, curve_i = row["deletion_curve"], row["insertion_curve"]
        assert len(curve_d) == 4 and curve_d[0] == curve_i[-1] == row["score"]
        assert curve_d[-1] == curve_i[0]
        assert row["drop"] == pytest.approx(max(0.0, row["score"] - row["masked_score"]) / row["score"], abs=1e-6)
        if checked < 3:  # the masked image through the artifact directly
            from gradcam_engine.engine.decode import decode_image

            pixels = decode_image(Path(path).read_bytes(), artifact.size).pixels[None]
            heat = np.clip(upsample(cam_of(result)[None], *artifact.size), 0, 1)
            out = session({"images": masked_by_cam(pixels, heat), "class_index": np.array([-1], np.int32)})
            assert row["masked_score"] == pytest.approx(float(out["predictions"][0, result["target_class"]]),
                                                        abs=1e-5)
            checked += 1
    overall = summary.info["overall"]["gradcam"]
    assert overall["faithfulness_images"] == 18 and len(overall["deletion_curve"]) == 4

    # An input changed since the run is reported, not measured on pixels the run never saw.
    other = scenario.copy(tmp_path / "other")
    try:
        write_image(Path(changed), scene(33, 21, 5))
        changed_run = evaluate(EvaluateConfig(str(other), faithfulness=("drop",), session=CPU, progress=False))
    finally:
        Path(changed).write_bytes(backup)
    row = next(r for r in metrics_rows(other) if r["path"] == changed)
    assert row["score"] is None and "the file changed since the run" in row["error"]
    assert changed_run.info["counts"]["faithfulness_errors"] == 1


BLOCKED_TF = r"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"tensorflow", "keras", "tf2onnx", "tf_keras"}:
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, Blocked())
from gradcam_engine.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "tf": "tensorflow" in sys.modules}))
"""


def test_evaluate_and_report_need_no_tensorflow(scenario: Scenario, tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    done = run_python(BLOCKED_TF, "evaluate", str(run_dir), "--boxes", str(scenario.boxes_csv), "--faithfulness",
                      "drop", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "tf": False}
    assert "Average Drop" in done.stdout
    done = run_python(BLOCKED_TF, "report", str(run_dir))
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1])["tf"] is False, done.stderr


# --- several CAM methods ----------------------------------------------------------------------------------------------

def test_every_cam_column_is_evaluated_under_its_method_name(scenario: Scenario, tmp_path: Path) -> None:
    run_dir = scenario.copy(tmp_path / "run")
    add_method(run_dir, "mirror")
    summary = evaluate(EvaluateConfig(str(run_dir), labels=str(scenario.labels_csv), boxes=str(scenario.boxes_csv),
                                      faithfulness=("drop",), session=CPU, progress=False))
    rows = metrics_rows(run_dir)
    assert sorted((r["path"], r["method"]) for r in rows) == sorted(
        (p, m) for p in scenario.rows for m in ("gradcam", "mirror"))
    assert list(summary.info["overall"]) == ["gradcam", "mirror"] == summary.info["methods"]
    by = {(r["path"], r["method"]): r for r in rows}
    for path, boxes in scenario.boxes.items():
        result = scenario.rows[path]
        expected = box_scores(cam_of(result)[None, :, ::-1], np.array([[result["width"], result["height"]]]),
                              np.array(boxes), np.zeros(len(boxes), int))
        assert by[(path, "mirror")]["energy"] == pytest.approx(expected.energy[0], abs=1e-6)
        assert by[(path, "mirror")]["score"] == by[(path, "gradcam")]["score"]  # same image, same model
    for name in summary.info["per_class"]:
        assert set(summary.info["per_class"][name]) == {"gradcam", "mirror"}
    assert "mirror: pointing game" in summary.text()


def test_faithfulness_and_thumbnails_read_back_relative_and_non_utf8_inputs_from_anywhere(
        artifact: SmallArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The results store a relative path as the run spelled it and an undecodable byte escaped; evaluate and report,
    started from another directory, still read each input back as the run read it."""
    from gradcam_engine.report import write_report

    work = tmp_path / "work"
    folder = work / "photos"
    folder.mkdir(parents=True)
    write_image(folder / "plain.png", scene(70, 50, 1))
    odd = os.fsencode(folder) + b"/caf\xe9.png"  # not valid UTF-8
    with open(odd, "wb") as fh:
        fh.write((folder / "plain.png").read_bytes())
    monkeypatch.chdir(work)
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=["photos"], out=str(tmp_path / "run"), session=CPU,
                          progress=False))  # no overlays: the report renders thumbnails from the inputs
    paths = sorted(r["path"] for r in ds.dataset(str(tmp_path / "run" / "results")).to_table().to_pylist())
    assert paths == ["photos/caf\\xe9.png", "photos/plain.png"]

    labels = tmp_path / "labels.csv"  # absolute paths, matched to the run's relative ones
    labels.write_text(f"path,label\n{folder / 'plain.png'},cat\n")

    monkeypatch.chdir(tmp_path)  # elsewhere: "photos/..." names nothing from here
    summary = evaluate(EvaluateConfig(str(tmp_path / "run"), labels=str(labels), faithfulness=("drop",), session=CPU,
                                      progress=False))
    assert summary.info["counts"]["faithfulness_errors"] == 0
    assert {r["path"]: r["label"] for r in metrics_rows(tmp_path / "run")} == {"photos/plain.png": 0,
                                                                               "photos/caf\\xe9.png": None}
    scores = {r["path"]: r["score"] for r in metrics_rows(tmp_path / "run")}
    assert scores["photos/caf\\xe9.png"] == pytest.approx(scores["photos/plain.png"], abs=1e-6)  # same pixels

    report = write_report(tmp_path / "run")
    assert (report.rendered, report.unreadable) == (2, 0)


def test_evaluate_methods_limits_box_metrics_and_faithfulness_to_the_chosen_methods(
        scenario: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main
    from gradcam_engine.report import write_report

    run_dir = scenario.copy(tmp_path / "run")
    add_method(run_dir, "mirror")
    args = ["evaluate", str(run_dir), "--labels", str(scenario.labels_csv), "--boxes", str(scenario.boxes_csv),
            "--faithfulness", "drop", "--device", "cpu", "--threads", "1"]
    assert main([*args, "--methods", "mirror"]) == 0
    chosen = metrics_rows(run_dir)
    assert sorted((r["path"], r["method"]) for r in chosen) == sorted((p, "mirror") for p in scenario.rows)
    info = metrics_json(run_dir)
    assert info["methods"] == ["mirror"] == list(info["overall"]) and info["fingerprint"]["methods"] == ["mirror"]
    assert all(set(by_method) == {"mirror"} for by_method in info["per_class"].values())
    html = write_report(run_dir).path.read_text()  # the report shows the figures of the evaluated method only
    assert "mirror pointing game" in html and "gradcam pointing game" not in html
    assert "Worst localised (mirror:" in html and "evaluated methods: mirror of gradcam, mirror" in html

    # The choice is part of what the metrics were asked for: all methods now is refused, then replaces them.
    capsys.readouterr()
    assert main(args) == 2
    assert "different methods" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    every = {(r["path"], r["method"]): r for r in metrics_rows(run_dir)}
    assert len(every) == 2 * len(scenario.rows) and metrics_json(run_dir)["methods"] == ["gradcam", "mirror"]
    for row in chosen:  # the mirror rows are the same whether it was evaluated alone or with gradcam
        both = every[(row["path"], "mirror")]
        for name in ("pointing_hit", "energy", "iou", "score", "masked_score", "drop"):
            assert (row[name] is None) == (both[name] is None), name
            assert row[name] is None or row[name] == pytest.approx(both[name], abs=1e-6), name
    assert any(every[(p, "mirror")]["drop"] != every[(p, "gradcam")]["drop"] for p in scenario.boxes)

    assert main([*args, "--methods", "gradcam,eigen", "--overwrite"]) == 2
    assert "--methods eigen: not a CAM method of this run; it has gradcam,mirror" in capsys.readouterr().err
    assert metrics_json(run_dir)["methods"] == ["gradcam", "mirror"]  # refused before anything was replaced


def test_faithfulness_of_a_bf16_run_is_measured_on_the_fp32_graph_and_says_so(
        artifact: SmallArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--precision bf16` runs the fp32 SavedModel under TensorFlow's oneDNN bf16 rewrite; ONNX Runtime has no bf16
    kernels, so the faithfulness probe scores the same fp32 graph, and metrics.json says so. Where TensorFlow cannot
    compute bf16 at all (no AVX-512), a run whose run.json says bf16 stands in for one."""
    from gradcam_engine.cli.main import main
    from gradcam_engine.engine import cpu
    from gradcam_engine.engine.decode import decode_image

    images = tmp_path / "images"
    paths = [write_image(images / f"s_{i}.png", scene(70 + 9 * i, 60, 90 + i)) for i in range(5)]
    run_dir = tmp_path / "run"
    real = cpu.native_bf16() or "avx512f" in cpu.cpu_flags()  # natively, or emulated by oneDNN with bf16 rounding
    if real:
        flags = cpu.cpu_flags() | {"avx512_bf16"}
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
        run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(run_dir), progress=False,
                              session=SessionOptions(backend="tf", device="cpu", precision="bf16")))
    else:
        run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(run_dir), session=CPU,
                              progress=False))
        info = json.loads((run_dir / "run.json").read_text())
        (run_dir / "run.json").write_text(json.dumps({**info, "precision": "bf16"}))
    assert json.loads((run_dir / "run.json").read_text())["precision"] == "bf16"

    assert main(["evaluate", str(run_dir), "--faithfulness", "drop", "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "scored through the fp32 ONNX graph (the run was bf16" in out
    probe = metrics_json(run_dir)["faithfulness_probe"]
    assert (probe["backend"], probe["precision"], probe["run_precision"]) == ("onnx", "fp32", "bf16")
    fp32 = GradCAMSession(artifact.root, CPU)
    rows = {r["path"]: r for r in metrics_rows(run_dir)}
    run_rows = rows_by_path(run_dir)
    for path in paths:
        row = rows[str(path)]
        pixels = decode_image(path.read_bytes(), artifact.size).pixels[None]
        expected = fp32({"images": pixels, "class_index": np.array([-1], np.int32)})["predictions"][0]
        assert row["score"] == pytest.approx(float(expected[row["target_class"]]), abs=1e-5)  # fp32's, exactly
        assert row["score"] == pytest.approx(run_rows[str(path)]["predicted_score"], abs=0.05)  # bf16 ran close


def test_faithfulness_of_a_run_with_a_chosen_target_scores_that_target_not_the_top1(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    """The CAM explains the run's target class, so deleting what it highlights is scored on that class's output."""
    from gradcam_engine.engine.decode import decode_image

    images = tmp_path / "images"
    paths = [write_image(images / f"s_{i}.png", scene(60 + 9 * i, 64, 40 + i)) for i in range(6)]
    run_dir = tmp_path / "run"
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images)], out=str(run_dir), session=CPU,
                          target="1", progress=False))
    run_rows = rows_by_path(run_dir)
    assert {r["target_class"] for r in run_rows.values()} == {1}
    other = [p for p in map(str, paths) if run_rows[p]["predicted_class"] != 1]
    assert other, "every image predicts class 1: the target would not be told apart from the top-1"

    evaluate(EvaluateConfig(str(run_dir), faithfulness=("drop",), session=CPU, progress=False))
    rows = {r["path"]: r for r in metrics_rows(run_dir)}
    session = GradCAMSession(artifact.root, CPU)
    for path in map(str, paths):
        pixels = decode_image(Path(path).read_bytes(), artifact.size).pixels[None]
        expected = session({"images": pixels, "class_index": np.array([1], np.int32)})["predictions"][0]
        assert rows[path]["score"] == pytest.approx(float(expected[1]), abs=1e-5)
    for path in other:
        assert rows[path]["score"] != pytest.approx(run_rows[path]["predicted_score"], abs=1e-5)
