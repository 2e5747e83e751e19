"""What a run tells its user: a progress line with img/s and ETA on a terminal only, and a one-line summary."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from gradcam_engine.cli.main import main
from gradcam_engine.engine.progress import Progress
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from engine_support import SmallArtifact, artifact, write_scenes  # noqa: F401 (fixture)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_nothing_when_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(10, stream=stream)
    assert progress.enabled is False
    for _ in range(10):
        progress.update(1)
    progress.close()
    assert stream.getvalue() == ""


def test_progress_is_on_by_default_on_a_terminal() -> None:
    stream = Terminal()
    progress = Progress(3, stream=stream)
    progress.update(3)
    progress.close()
    assert "3/3" in stream.getvalue()


def test_enabled_progress_shows_count_images_per_second_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress(100, stream=stream, enabled=True, every=0.0)
    progress.update(25)
    first = stream.getvalue()
    assert first.startswith("\r")
    assert re.search(r"25/100 +[0-9.]+ img/s ETA \d+:\d\d", first), first
    progress.update(75)
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert re.search(r"100/100 +[0-9.]+ img/s ETA 0:00\n$", last), last
    assert "[" + "#" * 30 + "]" in last


def test_progress_line_before_any_rate_shows_an_unknown_eta() -> None:
    progress = Progress(5, stream=io.StringIO(), enabled=True)
    assert progress.line(0.0).endswith("0/5     0.0 img/s ETA --:--")


def progress_counts(text: str, total: int) -> list[int]:
    """The image counts of every progress line written, in order."""
    return [int(m.group(1)) for m in re.finditer(rf"\] +(\d+)/{total} ", text)]


def test_a_run_drives_the_progress_bar_to_the_number_of_inputs(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    write_scenes(tmp_path / "images", [(64, 64), (30, 40), (120, 90), (50, 70), (80, 20)])
    (tmp_path / "images" / "broken.jpg").write_bytes(b"")  # an error row counts as done too
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(tmp_path / "images")], out=str(tmp_path / "run"),
                          batch_size=2, progress=True))
    err = capsys.readouterr().err
    counts = progress_counts(err, 6)
    assert counts and counts == sorted(counts) and counts[-1] == 6, f"progress written: {err!r}"
    assert re.search(r"6/6 +[0-9.]+ img/s ETA 0:00\n$", err), err


def test_the_command_line_shows_progress_on_a_terminal(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_scenes(tmp_path / "images", [(64, 64), (30, 40), (120, 90), (50, 70)])
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["run", str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                 "--batch-size", "1"]) == 0
    counts = progress_counts(terminal.getvalue(), 4)
    assert counts and counts[-1] == 4, f"progress written: {terminal.getvalue()!r}"


def test_disabled_progress_in_a_run_writes_nothing_to_stderr(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    write_scenes(tmp_path / "images", [(64, 64), (30, 40)])
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(tmp_path / "images")], out=str(tmp_path / "run")))
    assert capsys.readouterr().err == ""


def test_the_cli_prints_one_summary_line_with_counts_speed_and_where_the_results_are(
        artifact: SmallArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    write_scenes(tmp_path / "images", [(64, 64), (30, 40), (120, 90)])
    (tmp_path / "images" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["run", str(artifact.root), str(tmp_path / "images"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    line = printed[0]
    assert line.startswith("4 images: 3 ok, 1 errors;")
    assert re.search(r"\([0-9.]+ img/s, onnx( fp32)? on cpu\)", line), line
    assert f"Results: {out / 'results'}/ (Parquet)" in line
    assert f"summary {out / 'run.json'}" in line
