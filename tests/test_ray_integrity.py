"""The Ray runner keeps the run directory's guarantees: one writer, a journal of the shards its writer tasks commit,
verified resume, any file name, the manifest checked before any image, and a graceful stop on a signal. One local
Ray (2 CPUs) serves the module, as in test_ray_runner."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions
from engine_support import (SmallArtifact, artifact, copy_artifact, encode, scene,  # noqa: F401 (fixture)
                            write_scenes)
from rundir_support import gradcam_here, journal_shards, one_line, run_json, slow_images


def config(art: Path, inputs: list[Path], out: Path, **options: Any) -> RunConfig:
    return RunConfig(artifact=str(art), inputs=[str(p) for p in inputs], out=str(out), progress=False,
                     session=SessionOptions(threads=1), **{"batch_size": 2, "shard_size": 4, **options})


def test_ray_refuses_a_run_directory_another_run_holds_before_starting_ray(
        artifact: SmallArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from gradcam_engine.engine import ray_run
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.runlock import RunLock

    started: list[str] = []
    monkeypatch.setattr(ray_run, "ray_session", lambda ray, options: started.append("ray") or nullcontext())
    write_scenes(tmp_path / "images", [(40, 30), (30, 40)])
    (tmp_path / "run").mkdir()
    held = RunLock(tmp_path / "run")
    held.acquire()
    try:
        with pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()} on "):
            ray_run.run_gradcam_ray(config(artifact.root, [tmp_path / "images"], tmp_path / "run"),
                                    ray_run.RayOptions(concurrency=1))
    finally:
        held.release()
    assert started == [] and list((tmp_path / "run").iterdir()) == []


def test_ray_commit_seconds_is_refused_in_one_line(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write_scenes(tmp_path / "images", [(40, 30)])
    code, _, err = gradcam_here([str(artifact.root), str(tmp_path / "images"), "--out", str(tmp_path / "run"),
                                 "--runner", "ray", "--commit-seconds", "5"], capsys)
    assert code == 2 and one_line(err).startswith("gradcam run: error: --commit-seconds needs --runner local")
    assert not (tmp_path / "run").exists()


def test_a_ray_run_whose_lock_is_taken_over_stops_with_a_one_line_error(
        ray_cluster: Any, artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    slow_images(tmp_path / "slow", 40)
    run_dir = tmp_path / "run"
    lock = run_dir / "run.lock"
    taken: dict[str, Any] = {}

    def take_over_after_a_commit() -> None:
        deadline = time.monotonic() + 120
        while not journal_shards(run_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        taken["lock"] = json.dumps({**json.loads(lock.read_text()), "token": "another run's"}) + "\n"
        lock.write_text(taken["lock"])  # what a run that judged this one dead would hold
        taken["run.json"] = (run_dir / "run.json").read_bytes()

    thief = threading.Thread(target=take_over_after_a_commit)
    thief.start()
    try:
        with pytest.raises(RunError, match="run lock was taken over by another run") as failed:
            run_gradcam_ray(config(artifact.root, [tmp_path / "slow"], run_dir), RayOptions(concurrency=1))
    finally:
        thief.join()
    assert "\n" not in str(failed.value) and "Traceback" not in str(failed.value)
    assert lock.read_text() == taken["lock"]  # the directory is left to its new holder
    assert (run_dir / "run.json").read_bytes() == taken["run.json"]
    assert sum(line["rows"] for line in journal_shards(run_dir)) < 40


def test_ray_resume_verifies_every_shard_its_writers_committed_and_names_any_file(
        ray_cluster: Any, artifact: SmallArtifact, tmp_path: Path) -> None:  # noqa: F811
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray
    from gradcam_engine.engine.results import path_key

    folder = tmp_path / "images"
    write_scenes(folder, [(40 + i, 30 + i) for i in range(9)])
    odd = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")
    Path(odd).write_bytes(encode(scene(48, 36, 1), "PNG"))
    listed = os.fsdecode(os.fsencode(tmp_path) + b"/\xff listed.jpg")
    Path(listed).write_bytes(encode(scene(30, 30, 2), "JPEG"))
    (tmp_path / "list.txt").write_bytes(b"\xff listed.jpg\n")
    member = os.fsdecode(b"na\xefve.jpg")
    with tarfile.open(tmp_path / "shard.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        data = encode(scene(44, 33, 4), "JPEG")
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    run_dir = tmp_path / "run"
    job = config(artifact.root, [folder, tmp_path / "list.txt", tmp_path / "shard.tar"], run_dir, overlays="all")

    first = run_gradcam_ray(job, RayOptions(concurrency=1))

    expected = {str(p) for p in folder.iterdir()} | {listed, f"{tmp_path / 'shard.tar'}::{member}"}
    rows = pq.read_table(run_dir / "results").to_pylist()
    assert sorted(path_key(row["path"]) for row in rows) == sorted(expected)
    assert (first.images, first.ok) == (12, 12) and len(os.listdir(run_dir / "overlays")) == 12
    journaled = journal_shards(run_dir)
    assert {line["name"] for line in journaled} == {p.name for p in (run_dir / "results").iterdir()}
    assert sum(line["rows"] for line in journaled) == 12

    # Damage one committed shard and un-journal another, as a kill between a writer's rename and the journal does.
    victim, unjournaled = sorted(journaled, key=lambda line: line["name"])[:2]
    victim_path = run_dir / "results" / victim["name"]
    data = victim_path.read_bytes()
    victim_path.write_bytes(data[:len(data) // 2] + b"\x5a" * 64 + data[len(data) // 2 + 64:])
    journal = run_dir / "journal.jsonl"
    journal.write_text("".join(line for line in journal.read_text().splitlines(keepends=True)
                               if unjournaled["name"] not in line))

    again = run_gradcam_ray(job, RayOptions(concurrency=1))

    assert (again.processed, again.ok) == (victim["rows"], 12)
    verified = run_json(run_dir)["verified_at_start"]
    assert verified["adopted"] == [unjournaled["name"]]
    assert [event["shard"] for event in verified["set_aside"]] == [victim["name"]]
    assert (run_dir / "damaged" / victim["name"]).exists()
    table = pd.read_parquet(run_dir / "results")
    assert len(table) == 12 and sorted(path_key(p) for p in table["path"]) == sorted(expected)


def test_ray_checks_the_manifest_before_any_image_is_read(ray_cluster: Any, artifact: SmallArtifact,  # noqa: F811
                                                          tmp_path: Path) -> None:
    from gradcam_engine.engine.errors import ArtifactError
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    copy = copy_artifact(artifact, tmp_path / "artifact")
    manifest = json.loads((copy.root / "manifest.json").read_text())
    manifest["class_names"] = ["cat", "dog", "fish"]
    (copy.root / "manifest.json").write_text(json.dumps(manifest))
    write_scenes(tmp_path / "images", [(40, 30)])
    with pytest.raises(ArtifactError, match='"class_names" is'):
        run_gradcam_ray(config(copy.root, [tmp_path / "images"], tmp_path / "run"), RayOptions(concurrency=1))
    assert not (tmp_path / "run").exists()


def test_ray_run_stops_gracefully_on_a_signal_and_resumes(ray_cluster: Any, artifact: SmallArtifact,  # noqa: F811
                                                          tmp_path: Path) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray
    from gradcam_engine.engine.signals import RunInterrupted

    slow_images(tmp_path / "slow", 40)
    run_dir = tmp_path / "run"
    job = config(artifact.root, [tmp_path / "slow"], run_dir)

    def interrupt_after_a_commit() -> None:
        deadline = time.monotonic() + 120
        while not journal_shards(run_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    late: list[int] = []  # a signal that came after the run had ended must not end the test session
    previous = signal.signal(signal.SIGINT, lambda signum, frame: late.append(signum))
    sender = threading.Thread(target=interrupt_after_a_commit)
    try:
        sender.start()
        with pytest.raises(RunInterrupted) as stopped:
            run_gradcam_ray(job, RayOptions(concurrency=1))
        sender.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert late == [] and stopped.value.exit_code == 130
    state = run_json(run_dir)
    assert state["status"] == "interrupted" and "SIGINT" in state["reason"]
    committed = sum(line["rows"] for line in journal_shards(run_dir))
    assert 0 < committed < 40 and state["counts"]["ok"] == committed
    assert not (run_dir / "run.lock").exists()

    complete = run_gradcam_ray(job, RayOptions(concurrency=1))
    assert (complete.images, complete.ok) == (40, 40)
    paths = pq.read_table(run_dir / "results", columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 40
