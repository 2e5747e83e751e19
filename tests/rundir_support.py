"""Shared by the run-directory tests: the command line as a child process or in this one, slow inputs that leave
time to send a signal, a run directory's journal and run.json, and real file systems (a tmpfs that fills up, a
read-only bind mount) for the failures a disk causes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from engine_support import REPO, child_env

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root (CI runs as root)")


def gradcam(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`gradcam ARGS` in a child process."""
    return subprocess.run([sys.executable, "-m", "gradcam_engine.cli", *args], cwd=cwd or REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def gradcam_here(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`gradcam run ARGV` in this process: (exit code, stdout, stderr)."""
    from gradcam_engine.cli.main import main

    capsys.readouterr()
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`gradcam run ARGV` in this process; its summary (fails on a non-zero exit)."""
    code, out, err = gradcam_here(argv, capsys)
    assert code == 0, err
    return out


def start_gradcam(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradcam_engine.cli", *args], cwd=cwd or REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a child; (exit code, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def wait_for(condition: Callable[[], bool], process: subprocess.Popen | None = None, timeout: float = 60,
             what: str = "the condition") -> None:
    """Poll until `condition` holds; fails if the child ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()}")  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)


def one_line(stderr: str) -> str:
    """The single line a failure prints; fails on a traceback or several lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def run_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def journal_shards(run_dir: Path) -> list[dict[str, Any]]:
    """The shard lines of a run directory's journal (none when it has no journal yet)."""
    path = run_dir / "journal.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("kind") == "shard"]


def stray_files(run_dir: Path) -> list[Path]:
    """Temporary files and staging leftovers: a run that ended, however it ended, leaves none."""
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or ".staging" in p.parts]


def slow_images(folder: Path, count: int, side: int = 2500) -> list[Path]:
    """`count` names of one smooth PNG of side x side pixels (hard links: one file on disk); decoding each takes
    about 0.1 s here, so a run lasts long enough to be signalled mid-way."""
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side]
    pixels = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side], -1).astype(np.uint8)
    first = folder / "slow_0000.png"
    Image.fromarray(pixels).save(first, compress_level=1)
    paths = [first]
    for i in range(1, count):
        path = folder / f"slow_{i:04d}.png"
        os.link(first, path)
        paths.append(path)
    return paths


@contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real, small file system at mount_point (root only), unmounted afterwards whatever happens."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(mount_point: Path) -> Path:
    """Fill a file system to the last byte; returns the filler file (delete it to free the space)."""
    filler = mount_point / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    return filler


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """folder, bind-mounted read-only onto itself (a chmod does not stop root), restored afterwards."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
