"""Stopping a run: the first SIGINT or SIGTERM stops taking inputs, commits what is in flight and says so in one line
(exit 130 or 143, run.json "interrupted"); a second one leaves at once; SIGKILL loses at most the open shard, which a
time-based commit keeps small. Real signals, sent to a real `gradcam run` process."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gradcam_engine.cli.main import main
from engine_support import SmallArtifact, artifact, results_table, rows_by_path  # noqa: F401 (fixture)
from rundir_support import finish, journal_shards, one_line, run_json, slow_images, start_gradcam, stray_files, wait_for

INPUTS = 64
OVERLAYS = 6


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slow_inputs")
    slow_images(folder, INPUTS)
    return folder


def committed_rows(run_dir: Path) -> int:
    return sum(line["rows"] for line in journal_shards(run_dir))


def signalled(argv: list[str], run_dir: Path, signals: list[int], gap: float = 0.1) -> tuple[int, str, int]:
    """Start a run, send `signals` (gap seconds apart) once it has committed a shard; (exit code, stderr, rows
    committed when the first signal went)."""
    process = start_gradcam("run", *argv)
    try:
        before = len(journal_shards(run_dir))
        wait_for(lambda: len(journal_shards(run_dir)) > before, process, what="a shard commit")
        at_signal = committed_rows(run_dir)
        for i, signum in enumerate(signals):
            if i:
                time.sleep(gap)
            process.send_signal(signum)
    finally:
        code, _, err = finish(process, timeout=60)
    return code, err, at_signal


def assert_consistent(run_dir: Path) -> int:
    """results/ holds exactly the journaled rows, with overlays for exactly the committed rows that get one; no
    temporary file or lock is left. Returns the number of rows."""
    from gradcam_engine.engine.overlay import overlay_name

    rows = rows_by_path(run_dir)
    assert len(rows) == committed_rows(run_dir)
    first = {p for p in rows if Path(p).name < f"slow_{OVERLAYS:04d}"}  # the first OVERLAYS inputs get one
    assert {p.name for p in (run_dir / "overlays").glob("*.jpg")} == {overlay_name(p) for p in first}
    assert stray_files(run_dir) == [] and not (run_dir / "run.lock").exists()
    return len(rows)


def test_signals_stop_a_run_gracefully_once_and_at_once_twice(artifact: SmallArtifact, slow: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(slow), "--out", str(run_dir), "--workers", "1", "--threads", "1",
            "--batch-size", "2", "--shard-size", "2", "--overlays", str(OVERLAYS)]

    code, err, at_signal = signalled(argv, run_dir, [signal.SIGTERM])
    assert code == 143
    line = one_line(err)
    rows = assert_consistent(run_dir)
    assert at_signal < rows < INPUTS  # what was in flight was committed, the rest was not started
    assert line == (f"gradcam run: interrupted by SIGTERM: {rows} rows committed by this run, {rows} of {INPUTS} "
                    f"inputs done, {INPUTS - rows} left; rerun the same command to resume")
    state = run_json(run_dir)
    assert state["status"] == "interrupted" and "SIGTERM" in state["reason"]
    assert (state["counts"]["ok"], state["counts"]["no_row_yet"]) == (rows, INPUTS - rows)

    code, err, at_signal = signalled(argv, run_dir, [signal.SIGINT])
    assert code == 130
    assert one_line(err).startswith("gradcam run: interrupted by SIGINT: ")
    again = assert_consistent(run_dir)
    assert rows < at_signal < again < INPUTS and run_json(run_dir)["status"] == "interrupted"

    # Larger batches keep more in flight, so the second signal surely comes while the first stop is committing.
    code, err, _ = signalled([*argv, "--batch-size", "8"], run_dir, [signal.SIGINT, signal.SIGINT])
    assert code == 130
    assert one_line(err).startswith("gradcam run: stopped at once by a second SIGINT")
    assert run_json(run_dir)["status"] == "interrupted" and not (run_dir / "run.lock").exists()

    assert main(["run", *argv]) == 0  # the rerun completes: exactly one row per input
    assert len(rows_by_path(run_dir)) == INPUTS
    assert run_json(run_dir)["status"] == "complete" and stray_files(run_dir) == []


def test_a_shard_is_committed_every_commit_seconds_so_a_kill_loses_little(artifact: SmallArtifact,  # noqa: F811
                                                                         slow: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [str(artifact.root), str(slow), "--out", str(run_dir), "--workers", "1", "--threads", "1",
            "--batch-size", "2", "--shard-size", "100000", "--commit-seconds", "0.5"]
    process = start_gradcam("run", *argv)
    try:
        wait_for(lambda: len(journal_shards(run_dir)) >= 2, process, what="two time-based commits")
        process.send_signal(signal.SIGKILL)
    finally:
        code, _, _ = finish(process, timeout=60)
    assert code == -signal.SIGKILL
    committed = committed_rows(run_dir)
    assert 0 < committed < INPUTS and results_table(run_dir).num_rows == committed

    assert main(["run", *argv]) == 0
    assert len(rows_by_path(run_dir)) == INPUTS
    assert run_json(run_dir)["counts"]["processed_this_run"] == INPUTS - committed


def test_a_second_signal_in_a_library_call_raises_keyboard_interrupt_instead_of_ending_the_process(
        artifact: SmallArtifact, slow: Path, tmp_path: Path) -> None:  # noqa: F811
    """A notebook calling run_gradcam keeps its interpreter: the second Ctrl-C is a KeyboardInterrupt there."""
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.run_config import RunConfig
    from gradcam_engine.engine.session import SessionOptions

    run_dir = tmp_path / "run"

    def interrupt_twice() -> None:
        wait_for(lambda: bool(journal_shards(run_dir)), what="a shard commit")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    late: list[int] = []  # a signal after the run must not end the test session
    previous = signal.signal(signal.SIGINT, lambda signum, frame: late.append(signum))
    sender = threading.Thread(target=interrupt_twice)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(slow)], out=str(run_dir), batch_size=8,
                                  shard_size=2, workers=1, progress=False, session=SessionOptions(threads=1)))
        sender.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert late == []
    state = run_json(run_dir)
    assert state["status"] == "interrupted" and "second SIGINT" in state["reason"]
    assert not (run_dir / "run.lock").exists()
