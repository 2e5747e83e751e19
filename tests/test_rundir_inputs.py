"""Inputs as a resumed run sees them: every path-list line is one input, verbatim; a FIFO is refused, never waited
on; a recursive glob does not follow symlinked folders; the same inputs spelled differently resume; counts describe
the current listing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine_support import (SmallArtifact, artifact, encode, rows_by_path, run_python,  # noqa: F401 (fixture)
                            scene, write_scenes)
from rundir_support import gradcam, one_line, run_json, run_ok




def test_every_non_empty_path_list_line_is_one_input_taken_verbatim(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    names = [" leading space.png", "trailing space.png ", "#hash first.png", "plain.png", "crlf ended.png"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(encode(scene(30 + i, 30, i), "PNG"))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b" leading space.png\n\ntrailing space.png \n#hash first.png\nplain.png\ncrlf ended.png\r\n")

    out = run_ok([str(artifact.root), str(listing), "--out", str(tmp_path / "run")], capsys)

    rows = rows_by_path(tmp_path / "run")
    assert sorted(rows) == sorted(str(tmp_path / name) for name in names)
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert out.startswith("5 images: 5 ok, 0 errors")


@pytest.mark.parametrize("name", ["list.txt", "x.tar"])
def test_a_fifo_given_as_a_path_list_or_a_tar_is_an_error_never_a_hang(artifact: SmallArtifact,  # noqa: F811
                                                                      tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    done = gradcam("run", str(artifact.root), str(fifo), "--out", str(tmp_path / "run"), timeout=60)
    assert done.returncode == 2
    assert "must be a regular file" in one_line(done.stderr) and name in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_fifo_named_in_a_path_list_gets_an_error_row_never_a_hang(artifact: SmallArtifact,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "real.png").write_bytes(encode(scene(30, 30, 1), "PNG"))
    (tmp_path / "list.txt").write_text("pipe.jpg\nreal.png\n")
    done = gradcam("run", str(artifact.root), str(tmp_path / "list.txt"), "--out", str(tmp_path / "run"), timeout=60)
    assert done.returncode == 0, done.stderr
    rows = rows_by_path(tmp_path / "run")
    assert rows[str(tmp_path / "pipe.jpg")]["error"].endswith("not a regular file (read)")
    assert rows[str(tmp_path / "real.png")]["status"] == "ok"


# Listing runs in a child with a time limit: glob.glob walks a symlink loop until the path is too long, and two loops
# make that exponential (it never ends), which must fail this test rather than hang the suite.
LIST_KEYS = "import json, sys; from gradcam_engine.engine.inputs import list_inputs; " \
            "print(json.dumps([i.key for i in list_inputs(sys.argv[1:]).items]))"


def test_a_recursive_glob_does_not_follow_symlinked_folders(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for name in ("a.jpg", "sub/b.jpg", "sub/deeper/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "outside.jpg").write_bytes(b"x")
    (root / "sub" / "loop").symlink_to(root)            # back to an ancestor
    (root / "sub" / "deeper" / "loop2").symlink_to("..")  # a second loop
    (root / "link_out").symlink_to(tmp_path / "elsewhere")
    (root / "file_link.jpg").symlink_to(root / "a.jpg")  # a symlinked file is an input, as in a directory walk

    done = run_python(LIST_KEYS, f"{root}/**/*.jpg", timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    walked = run_python(LIST_KEYS, str(root), timeout=30)
    expected = [f"{root}/{name}" for name in ("a.jpg", "file_link.jpg", "sub/b.jpg", "sub/deeper/c.jpg")]
    assert json.loads(done.stdout) == expected
    assert sorted(json.loads(walked.stdout)) == expected  # the same inputs as walking the folder


def test_the_same_inputs_spelled_differently_resume_without_duplicates(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_scenes(tmp_path / "images", [(40 + i, 30 + i) for i in range(6)])
    (tmp_path / "alias").symlink_to(tmp_path / "images")
    run_ok([str(artifact.root), "images", "--out", "run"], capsys)

    for spelling in ("images/", "./images", str(tmp_path / "images"), "alias"):
        out = run_ok([str(artifact.root), spelling, "--out", "run"], capsys)
        assert "processed 0 " in out and "(6 already done, resumed)" in out, spelling

    assert len(rows_by_path(tmp_path / "run")) == 6
    recorded = run_json(tmp_path / "run")
    assert recorded["options"]["inputs"] == ["alias"]  # as typed
    assert recorded["fingerprint"]["inputs"] == [str((tmp_path / "images").resolve())]


def test_rows_of_inputs_no_longer_listed_are_counted_apart_and_kept(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    images = write_scenes(tmp_path / "images", [(40 + i, 30 + i) for i in range(10)])
    argv = [str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run")]
    run_ok(argv, capsys)
    for gone in images[3:5]:
        gone.unlink()

    out = run_ok(argv, capsys)

    assert out.startswith("8 images: 8 ok, 0 errors; 2 rows of inputs no longer listed kept in results/; "
                          "processed 0 ")
    counts = run_json(tmp_path / "run")["counts"]
    assert (counts["inputs"], counts["ok"], counts["rows_of_inputs_no_longer_listed"]) == (8, 8, 2)
    assert len(rows_by_path(tmp_path / "run")) == 10  # never deleted
