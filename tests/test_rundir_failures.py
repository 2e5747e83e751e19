"""Every failure a user can cause or meet ends in one line and exit code 2, with run.json "failed" and the reason
where the run directory is this run's, nothing committed lost and no temporary file left; a rerun after fixing the
cause completes. Disks fill up and turn read-only for real: a small tmpfs and a read-only bind mount (as root), and a
file-size limit that fails writes with EFBIG through the same write path (any user)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_support import (REPO, SmallArtifact, artifact, child_env, results_table, rows_by_path,  # noqa: F401
                            scene, write_image, write_scenes)
from rundir_support import (fill, gradcam_here, journal_shards, needs_root, one_line, read_only, run_json,
                            stray_files, tmpfs)



@needs_root
def test_a_full_disk_at_start_fails_in_one_line_and_leaves_nothing_behind(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(40, 30), (30, 40), (50, 50)])
    with tmpfs(tmp_path / "disk", "256k") as disk:
        filler = fill(disk)
        argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(disk / "run")]
        code, _, err = gradcam_here(argv, capsys)
        assert code == 2
        assert "No space left on device" in one_line(err)
        assert os.listdir(disk) == ["filler"]  # no run directory, no temporary file

        filler.unlink()
        code, out, err = gradcam_here(argv, capsys)
        assert code == 0, err
        assert len(rows_by_path(disk / "run")) == 3 and run_json(disk / "run")["status"] == "complete"


@needs_root
def test_a_full_disk_during_a_run_fails_in_one_line_and_keeps_what_was_committed(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(40 + i, 30 + i) for i in range(30)])
    with tmpfs(tmp_path / "disk", "128k") as disk:
        run_dir = disk / "run"
        argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir), "--shard-size", "2",
                "--batch-size", "2"]
        code, _, err = gradcam_here(argv, capsys)
        assert code == 2
        assert "No space left on device" in one_line(err)
        state = run_json(run_dir)
        assert state["status"] == "failed" and "No space left on device" in state["reason"]
        committed = sum(line["rows"] for line in journal_shards(run_dir))
        assert 0 < committed < 30
        assert results_table(run_dir).num_rows == committed  # what was committed reads back whole
        assert stray_files(run_dir) == []

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        code, out, err = gradcam_here(argv, capsys)
        assert code == 0, err
        assert out.startswith(f"30 images: 30 ok, 0 errors; processed {30 - committed} ")
        assert len(rows_by_path(run_dir)) == 30 and run_json(run_dir)["status"] == "complete"


# `gradcam ARGS` whose files may not grow past LIMIT bytes: a write beyond it fails with EFBIG through the real write
# path, as on a full disk, without root. SIGXFSZ, which would kill the process instead, is ignored.
LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)),) * 2); "
           "runpy.run_module('gradcam_engine.cli', run_name='__main__')")


def test_a_file_size_limit_during_a_run_fails_in_one_line_and_keeps_what_was_committed(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    folder = tmp_path / "images"
    write_scenes(folder, [(40 + i, 30 + i) for i in range(6)])
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), np.uint8)
    write_image(folder / "z_noise.png", noise)  # sorts last; its overlay outgrows the limit, the rest fit
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(folder), "--out", str(run_dir), "--overlays", "all", "--shard-size", "2",
            "--batch-size", "2", "--workers", "1"]
    limited = subprocess.run([sys.executable, "-c", LIMITED, str(96 << 10), "run", *argv], cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=120)
    assert limited.returncode == 2, limited.stderr
    assert "cannot write an overlay (File too large)" in one_line(limited.stderr)
    state = run_json(run_dir)
    assert state["status"] == "failed" and "File too large" in state["reason"]
    assert sum(line["rows"] for line in journal_shards(run_dir)) == results_table(run_dir).num_rows == 6
    assert stray_files(run_dir) == []

    code, out, err = gradcam_here(argv, capsys)  # the limit lifted
    assert code == 0, err
    assert out.startswith("7 images: 7 ok, 0 errors; processed 1 ")
    assert len(rows_by_path(run_dir)) == 7 and run_json(run_dir)["status"] == "complete"


@needs_root
def test_a_read_only_results_folder_is_found_before_any_image_is_read(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    folder = tmp_path / "images"
    write_scenes(folder, [(40, 30), (30, 40)])
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(folder), "--out", str(run_dir), "--overlays", "all"]
    assert gradcam_here(argv, capsys)[0] == 0
    for i in range(3):
        write_image(folder / f"new_{i}.png", scene(36, 28, 50 + i))
    overlays = sorted((run_dir / "overlays").iterdir())

    with read_only(run_dir / "results"):
        code, _, err = gradcam_here(argv, capsys)
        assert code == 2
        line = one_line(err)
        assert f"{run_dir / 'results'}: not writable (Read-only file system); nothing was computed" in line
        assert sorted((run_dir / "overlays").iterdir()) == overlays  # no new input was decoded
        state = run_json(run_dir)
        assert state["status"] == "failed" and "Read-only file system" in state["reason"]

    code, out, err = gradcam_here(argv, capsys)
    assert code == 0, err
    assert len(rows_by_path(run_dir)) == 5 and len(list((run_dir / "overlays").iterdir())) == 5


def test_a_truncated_run_json_is_rewritten_from_the_journal(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    write_scenes(tmp_path / "images", [(40, 30), (30, 40), (50, 50)])
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir)]
    assert gradcam_here(argv, capsys)[0] == 0
    text = (run_dir / "run.json").read_text()
    (run_dir / "run.json").write_text(text[:len(text) // 2])

    code, out, err = gradcam_here(argv, capsys)

    assert code == 0, err
    assert "processed 0 " in out
    state = run_json(run_dir)
    assert state["status"] == "complete" and "run.json was unreadable" in state["repaired"]
    assert len(rows_by_path(run_dir)) == 3


def test_an_unreadable_run_json_with_nothing_to_identify_the_run_is_refused_in_one_line(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(40, 30), (30, 40)])
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir)]
    assert gradcam_here(argv, capsys)[0] == 0
    (run_dir / "run.json").write_text('{"status": "compl')
    (run_dir / "journal.jsonl").unlink()
    shards = {p.name: p.read_bytes() for p in (run_dir / "results").iterdir()}

    code, _, err = gradcam_here(argv, capsys)

    assert code == 2
    line = one_line(err)
    assert f"{run_dir / 'run.json'}: unreadable" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in (run_dir / "results").iterdir()} == shards
    assert (run_dir / "run.json").read_text() == '{"status": "compl'  # not ours to rewrite: left as found
    assert gradcam_here([*argv, "--overwrite"], capsys)[0] == 0
    assert len(rows_by_path(run_dir)) == 2


@pytest.mark.parametrize("option", [("--workers", "-1"), ("--threads", "-1"), ("--shard-size", "0"),
                                    ("--batch-size", "0"), ("--commit-seconds", "0")], ids=" ".join)
def test_out_of_range_options_are_refused_in_one_line_before_anything_is_written(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        option: tuple[str, str]) -> None:
    write_scenes(tmp_path / "images", [(40, 30)])
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir)]
    fresh = tmp_path / "fresh"
    code, _, err = gradcam_here([str(artifact.root), str(tmp_path / "images"), "--out", str(fresh), *option], capsys)
    assert code == 2
    assert one_line(err).startswith(f"gradcam run: error: {option[0]} {option[1]}: must be")
    assert not fresh.exists()

    assert gradcam_here(argv, capsys)[0] == 0  # an existing run is left as it is
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = gradcam_here([*argv, *option], capsys)
    assert code == 2 and one_line(err)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
