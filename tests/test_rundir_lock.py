"""One writer per run directory: a second run fails at once naming the holder, a lock left by a dead run is taken
over, a live one never is, and two runs that find the same stale lock cannot both take it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradcam_engine.cli.main import main
from engine_support import (REPO, SmallArtifact, artifact, child_env, rows_by_path,  # noqa: F401 (fixture)
                            write_scenes)
from rundir_support import finish, gradcam, one_line, slow_images, start_gradcam, wait_for


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slow_inputs")
    slow_images(folder, 60)
    return folder


def test_a_second_run_on_a_busy_run_directory_fails_at_once_naming_the_holder(
        artifact: SmallArtifact, slow: Path, tmp_path: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    first = start_gradcam("run", str(artifact.root), str(slow), "--out", str(run_dir), "--workers", "1",
                          "--threads", "1", "--batch-size", "2", "--shard-size", "2")
    try:
        wait_for(lambda: (run_dir / "run.json").exists(), first, what="the first run's start")
        second = gradcam("run", str(artifact.root), str(slow), "--out", str(run_dir), "--shard-size", "7",
                         timeout=60)
        assert first.poll() is None, "the first run ended before the second was refused; it needs more inputs"
    finally:
        code, _, err = finish(first)
    assert second.returncode == 2
    line = one_line(second.stderr)
    assert "in use by another run" in line and f"pid {first.pid} on {socket.gethostname()}" in line
    assert code == 0, err
    assert len(rows_by_path(run_dir)) == 60  # one row per input: no duplicates from the refused run
    assert not (run_dir / "run.lock").exists()


def _process_start(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _lock(run_dir: Path, host: str, pid: int, pid_start: int | None, age: float = 0.0) -> Path:
    """A lock file as a run writes it (engine.runlock), with its heartbeat `age` seconds old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    lock.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+0000", "token": "t0",
                                "boot_id": boot_id, "pid_start": pid_start}))
    stamp = time.time() - age
    os.utime(lock, (stamp, stamp))
    return lock


@pytest.mark.parametrize("holder", ["dead pid on this host", "reused pid on this host",
                                    "other host, heartbeat 10 minutes old"])
def test_a_lock_left_by_a_dead_run_is_taken_over(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str], holder: str) -> None:
    write_scenes(tmp_path / "images", [(40, 30), (30, 40)])
    run_dir = tmp_path / "run"
    if holder == "dead pid on this host":
        gone = subprocess.Popen(["true"])
        gone.wait()
        _lock(run_dir, socket.gethostname(), gone.pid, None)
    elif holder == "reused pid on this host":  # the pid is alive, but started after the lock was written
        _lock(run_dir, socket.gethostname(), os.getpid(), _process_start(os.getpid()) - 1)
    else:
        _lock(run_dir, "another-node", 4242, 1, age=600)

    assert main(["run", str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir)]) == 0, \
        capsys.readouterr().err
    assert len(rows_by_path(run_dir)) == 2
    assert not (run_dir / "run.lock").exists()  # taken over, then released


@pytest.mark.parametrize("holder", ["live process on this host", "other host, fresh heartbeat"])
def test_a_lock_of_a_live_run_is_never_taken_over(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str], holder: str) -> None:
    write_scenes(tmp_path / "images", [(40, 30)])
    run_dir = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        if holder == "live process on this host":
            lock = _lock(run_dir, socket.gethostname(), sleeper.pid, _process_start(sleeper.pid))
            named = f"pid {sleeper.pid} on {socket.gethostname()}"
        else:
            lock = _lock(run_dir, "another-node", 4242, 1, age=5)
            named = "pid 4242 on another-node"
        before = lock.read_text()
        capsys.readouterr()
        assert main(["run", str(artifact.root), str(tmp_path / "images"), "--out", str(run_dir)]) == 2
        line = one_line(capsys.readouterr().err)
        assert "in use by another run" in line and named in line
        assert lock.read_text() == before
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing else written
    finally:
        sleeper.kill()
        sleeper.wait()


RACE = r"""
import sys, time
from pathlib import Path
from gradcam_engine.engine.errors import RunError
from gradcam_engine.engine.runlock import RunLock

run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
lock = RunLock(run_dir)
try:
    lock.acquire()
except RunError as e:
    print("refused", e)
    sys.exit(0)
print("acquired")
sys.stdout.flush()
time.sleep(3)
lock.release()
"""


def test_runs_that_find_the_same_stale_lock_cannot_both_take_it(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _lock(tmp_path / "run", socket.gethostname(), gone.pid, None)
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "run"), str(go)], cwd=REPO,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    time.sleep(1.5)  # every racer has started and waits for the signal to go
    go.touch()
    outcomes = [racer.communicate(timeout=60)[0].split(" ", 1)[0].strip() for racer in racers]
    assert sorted(outcomes) == ["acquired", "refused", "refused", "refused"]


def test_a_run_whose_lock_was_taken_over_commits_nothing_more(tmp_path: Path) -> None:
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.runlock import RunLock

    lock = RunLock(tmp_path)
    lock.acquire()
    lock.check()
    taken = json.loads((tmp_path / "run.lock").read_text()) | {"token": "someone else", "pid": 4242}
    (tmp_path / "run.lock").write_text(json.dumps(taken))
    with pytest.raises(RunError, match="taken over by another run"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["token"] == "someone else"  # not ours to remove


def test_a_live_runs_heartbeat_keeps_its_lock_fresh_for_other_hosts(tmp_path: Path) -> None:
    """Another host judges the lock by its heartbeat's age alone: a run longer than that must keep it young."""
    from gradcam_engine.engine.runlock import RunLock

    lock = RunLock(tmp_path, heartbeat_seconds=0.05)
    lock.acquire()
    try:
        old = time.time() - 600
        os.utime(lock.path, (old, old))  # as if the run had been going for ten minutes
        deadline = time.monotonic() + 10
        while lock.path.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > time.time() - 60, "the heartbeat never touched the lock"
        assert lock.still_held()
    finally:
        lock.release()
    assert not lock.path.exists()
