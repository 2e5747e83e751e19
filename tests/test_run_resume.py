"""Resuming: a rerun skips what is committed, a killed run loses or duplicates nothing, and a run directory holding a
different run is refused unless overwriting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.cli.main import main
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions
from engine_support import (SmallArtifact, artifact, cam_of, copy_artifact, kill_at_first_shard,  # noqa: F401 (fixture)
                            results_table, rows_by_path, scene, write_image, write_scenes)


def config(art: SmallArtifact, inputs: list[Path], out: Path, threads: int = 0, **options: object) -> RunConfig:
    return RunConfig(artifact=str(art.root), inputs=[str(p) for p in inputs], out=str(out), progress=False,
                     session=SessionOptions(threads=threads), **options)  # type: ignore[arg-type]


def tmp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 PNGs (8 distinct scenes), large enough that the run spends a noticeable time after its first shard."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    scenes = []
    for i in range(8):
        noisy = scene(360, 300, 1000 + i).astype(np.int16) + rng.integers(-20, 20, (300, 360, 3))
        scenes.append(write_image(folder / f"img_{i:03d}.png", np.clip(noisy, 0, 255).astype(np.uint8),
                                  compress_level=1).read_bytes())
    for i in range(8, 80):
        (folder / f"img_{i:03d}.png").write_bytes(scenes[i % 8])
    return folder


def test_running_the_same_command_again_processes_nothing_and_adds_no_rows(artifact: SmallArtifact,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    images = write_scenes(tmp_path / "images", [(50 + i, 40 + 2 * i) for i in range(10)])
    first = run_gradcam(config(artifact, [tmp_path / "images"], tmp_path / "run", shard_size=3, batch_size=2))
    before = results_table(tmp_path / "run")
    second = run_gradcam(config(artifact, [tmp_path / "images"], tmp_path / "run", shard_size=3, batch_size=2))
    assert (first.processed, first.skipped_resume) == (10, 0)
    assert (second.processed, second.skipped_resume) == (0, 10)
    assert (second.images, second.ok, second.errors) == (10, 10, 0)
    after = results_table(tmp_path / "run")
    assert sorted(after.column("path").to_pylist()) == sorted(str(p) for p in images)
    assert after.sort_by("path").equals(before.sort_by("path"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"


def test_a_run_killed_mid_way_resumes_with_exactly_one_row_per_input(artifact: SmallArtifact,  # noqa: F811
                                                                     many: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = run_dir / "results"
    kill_at_first_shard(["run", str(artifact.root), str(many), "--out", str(run_dir), "--shard-size", "4",
                         "--batch-size", "2", "--workers", "1", "--threads", "1", "--overlays", "all"], results)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    committed = results_table(run_dir).num_rows
    assert 0 < committed < 80
    # What a kill during a shard or overlay write leaves behind: half-written files under temporary names (an
    # overlay's belongs to an uncommitted row, so the rerun writes that overlay again).
    (results / ".part-000000076-000000079.parquet.deadbeef.tmp").write_bytes(b"PAR1 half written")
    (run_dir / "overlays").mkdir(exist_ok=True)
    (run_dir / "overlays" / ".000000079_img_079.jpg.tmp").write_bytes(b"\xff\xd8 half written")

    summary = run_gradcam(config(artifact, [many], run_dir, shard_size=4, batch_size=2, overlays="all"))

    assert (summary.skipped_resume, summary.processed) == (committed, 80 - committed)
    assert (summary.images, summary.ok, summary.errors) == (80, 80, 0)
    paths = results_table(run_dir).column("path").to_pylist()
    assert len(paths) == 80
    assert sorted(paths) == sorted(str(p) for p in many.iterdir())
    assert tmp_files(run_dir) == []
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert len(list((run_dir / "overlays").glob("*.jpg"))) == 80

    # The rows are those an uninterrupted run with the same batching and threads gives.
    clean = tmp_path / "clean"
    run_gradcam(config(artifact, [many], clean, batch_size=2, workers=1, threads=1))
    resumed, reference = rows_by_path(run_dir), rows_by_path(clean)
    for path, row in reference.items():
        assert resumed[path]["predicted_class"] == row["predicted_class"]
        np.testing.assert_allclose(cam_of(resumed[path]), cam_of(row), atol=1e-5, rtol=0)


def test_a_different_artifact_on_an_existing_run_directory_is_refused_unless_overwriting(
        artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    images = write_scenes(tmp_path / "images", [(64, 64), (80, 60), (30, 90)])
    run_gradcam(config(artifact, [tmp_path / "images"], tmp_path / "run"))
    before = results_table(tmp_path / "run")
    other = copy_artifact(artifact, tmp_path / "other_artifact")
    manifest = json.loads((other.root / "manifest.json").read_text())
    manifest["model_name"] = "another_model"  # same graph, but a different artifact as far as a run is concerned
    (other.root / "manifest.json").write_text(json.dumps(manifest, indent=2))

    with pytest.raises(RunError, match=r"different artifact_sha256.*--overwrite") as refused:
        run_gradcam(config(other, [tmp_path / "images"], tmp_path / "run"))
    assert str(tmp_path / "run") in str(refused.value)
    assert results_table(tmp_path / "run").equals(before)

    summary = run_gradcam(config(other, [tmp_path / "images"], tmp_path / "run", overwrite=True))
    assert (summary.processed, summary.skipped_resume, summary.ok) == (3, 0, 3)
    assert len(rows_by_path(tmp_path / "run")) == len(images)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["artifact"] == str(other.root)


def test_a_different_target_on_an_existing_run_directory_is_refused_unless_overwriting(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    images = write_scenes(tmp_path / "images", [(64, 64), (80, 60), (30, 90), (45, 45)])
    argv = ["run", str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    capsys.readouterr()

    assert main([*argv, "--target", "dog"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "class_index" in err and "--overwrite" in err
    kept = rows_by_path(tmp_path / "run")  # the earlier run's rows, untouched
    assert len(kept) == len(images)
    assert all(row["target_class"] == row["predicted_class"] for row in kept.values())

    assert main([*argv, "--target", "dog", "--overwrite"]) == 0
    rows = rows_by_path(tmp_path / "run")
    assert len(rows) == len(images)
    assert {row["target_class"] for row in rows.values()} == {1}
