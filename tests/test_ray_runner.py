"""The Ray runner writes the local runner's rows, run.json and overlays, resumes a run either runner started, and stays
out of the import path of everything else.

One local Ray (3 CPUs, a count this machine's own local Ray would not pick, so a run that joins it by address can be
told apart from one that started its own; small object store, no dashboard) serves the whole module; the model is a
small Keras CNN
exported once; the inputs are ~50 images in a directory and a tar shard, with a zero-byte file, text named .jpg and
a truncated JPEG among them. Paths are given relative to the test's directory, as a user would.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradcam_engine.engine.inputs import list_inputs
from gradcam_engine.engine.results import RESULTS_DIR
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.overlay import OVERLAY_DIR
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.rundir import RUN_JSON
from gradcam_engine.engine.session import SessionOptions
from gradcam_engine.export.parity import TOLERANCES

CLUSTER_CPUS = 3 if os.cpu_count() != 3 else 4
RAY_CPUS = CLUSTER_CPUS  # read by the conftest's ray_cluster: unlike this machine's count, so tests can tell them apart
# The same graph as the local run, its batches made up differently: rounding only, within the fp32 contract.
CAM_TOLERANCE = TOLERANCES["fp32"]["cam_max_abs_diff"]
SCORE_TOLERANCE = TOLERANCES["fp32"]["predictions_rel_diff"]
SHARD_SIZE = 8  # several shards for 50 images, so resume has something to lose
OVERLAYS = "12"
EXACT_COLUMNS = ("path", "status", "error", "width", "height", "predicted_class", "predicted_label",
                 "target_class", "cam_height", "cam_width")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Keras CNN with a softmax head, exported with the real exporter."""
    import keras

    from gradcam_engine.export import ExportOptions, export_artifact

    keras.utils.set_random_seed(7)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    root = tmp_path_factory.mktemp("ray_artifact") / "small_cnn"
    export_artifact(keras.Model(inputs, out, name="ray_small_cnn"), root,
                    ExportOptions(preprocessing="tf", class_names=["red", "green", "blue"]))
    return root


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    from PIL import Image

    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    pixels[h // 4: h // 2, w // 3: 2 * w // 3] = rng.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ (44 files, 3 of them bad, one non-image) and shard.tar (6 images), addressed relative to this dir."""
    root = tmp_path_factory.mktemp("ray_inputs")
    rng = np.random.default_rng(5)
    images = root / "images"
    for i in range(41):
        folder = images / ("sub" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        (folder / f"img_{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}").write_bytes(_image_bytes(rng, fmt))
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("this is text, not a JPEG\n")
    (images / "truncated.jpg").write_bytes(_image_bytes(rng, "JPEG")[:300])
    (images / "readme.txt").write_text("not an image: skipped\n")
    with tarfile.open(root / "shard.tar", "w") as archive:
        for i in range(6):
            data = _image_bytes(rng, "JPEG")
            info = tarfile.TarInfo(f"member_{i}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


def _config(artifact: Path, out: str) -> RunConfig:
    return RunConfig(artifact=str(artifact), inputs=["images", "shard.tar"], out=out, batch_size=4,
                     shard_size=SHARD_SIZE, overlays=OVERLAYS, progress=False, session=SessionOptions(threads=1))


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    table = pq.read_table(run_dir / RESULTS_DIR)
    return sorted(table.to_pylist(), key=lambda row: row["path"])


def _assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert {k: g[k] for k in EXACT_COLUMNS} == {k: w[k] for k in EXACT_COLUMNS}, g["path"]
        if w["status"] == "ok":
            np.testing.assert_allclose(g["cam"], w["cam"], atol=CAM_TOLERANCE, err_msg=g["path"])
            np.testing.assert_allclose([g["predicted_score"], g["target_score"]],
                                       [w["predicted_score"], w["target_score"]], rtol=SCORE_TOLERANCE,
                                       atol=SCORE_TOLERANCE)
        else:
            assert g["cam"] is None and g["predicted_class"] is None


@pytest.fixture(scope="module")
def local_run(artifact: Path, workdir: Path) -> Path:
    """The reference: the local runner on the same inputs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        run_gradcam(_config(artifact, "local_run"))
    return workdir / "local_run"


def test_ray_rows_equal_local_rows(ray_cluster: Any, artifact: Path, in_workdir: Path, local_run: Path) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    summary = run_gradcam_ray(_config(artifact, "ray_run"), RayOptions())
    local, remote = _rows(local_run), _rows(in_workdir / "ray_run")
    _assert_same_rows(remote, local)
    statuses = {r["path"]: r["status"] for r in remote}
    assert [p for p, s in statuses.items() if s == "error"] == [
        "images/empty.jpg", "images/notes.jpg", "images/truncated.jpg"]
    assert any(p.startswith("shard.tar::") and s == "ok" for p, s in statuses.items())
    assert (summary.images, summary.ok, summary.errors, summary.processed) == (50, 47, 3, 50)
    assert summary.skipped_non_image == 1

    local_json = json.loads((local_run / RUN_JSON).read_text())
    ray_json = json.loads((in_workdir / "ray_run" / RUN_JSON).read_text())
    assert ray_json["status"] == "complete" and ray_json["runner"] == "ray"
    assert ray_json["fingerprint"] == local_json["fingerprint"]
    assert ray_json["counts"] == local_json["counts"]
    overlays = sorted(p.name for p in (in_workdir / "ray_run" / OVERLAY_DIR).iterdir())
    assert overlays == sorted(p.name for p in (local_run / OVERLAY_DIR).iterdir())
    first = [item.key for item in list_inputs(["images", "shard.tar"]).items[:int(OVERLAYS)]]
    assert len(overlays) == sum(statuses[key] == "ok" for key in first) > 0
    for shard in (in_workdir / "ray_run" / RESULTS_DIR).glob("part-*.parquet"):
        table = pq.read_table(shard)
        assert table.schema == pq.read_table(next((local_run / RESULTS_DIR).glob("part-*.parquet"))).schema
        assert table.num_rows <= SHARD_SIZE


def test_ray_resumes_only_the_missing_inputs(ray_cluster: Any, artifact: Path, in_workdir: Path,
                                             local_run: Path) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    run_dir = in_workdir / "resumed"
    shutil.copytree(local_run, run_dir)  # a run the local runner committed, then lost two shards of
    shards = sorted((run_dir / RESULTS_DIR).glob("part-*.parquet"))
    lost = [shards[1], shards[-1]]
    lost_paths = {p for shard in lost for p in pq.read_table(shard, columns=["path"]).column("path").to_pylist()}
    for shard in lost:
        shard.unlink()
    (run_dir / RESULTS_DIR / ".part-000000099-000000100.parquet.1234abcd.tmp").write_bytes(b"half a shard")

    summary = run_gradcam_ray(_config(artifact, "resumed"), RayOptions(concurrency=1))
    assert summary.processed == len(lost_paths) and summary.skipped_resume == 50 - len(lost_paths)
    rows = _rows(run_dir)
    assert len(rows) == len({r["path"] for r in rows}) == 50
    _assert_same_rows(rows, _rows(local_run))
    assert not list((run_dir / RESULTS_DIR).glob(".*.tmp"))

    ray_shard = next(shard for shard in sorted((run_dir / RESULTS_DIR).glob("part-*.parquet"))
                     if set(pq.read_table(shard, columns=["path"]).column("path").to_pylist()) & lost_paths)
    ray_lost = pq.read_table(ray_shard, columns=["path"]).num_rows
    ray_shard.unlink()  # and now a shard the Ray runner wrote
    again = run_gradcam_ray(_config(artifact, "resumed"), RayOptions(concurrency=1))
    assert (again.processed, again.skipped_resume, again.ok, again.errors) == (ray_lost, 50 - ray_lost, 47, 3)
    _assert_same_rows(_rows(run_dir), _rows(local_run))

    complete = run_gradcam_ray(_config(artifact, "resumed"), RayOptions(concurrency=1))
    assert (complete.processed, complete.skipped_resume) == (0, 50)
    assert len(_rows(run_dir)) == 50


def test_the_local_runner_resumes_a_run_the_ray_runner_started(ray_cluster: Any, artifact: Path, in_workdir: Path,
                                                                local_run: Path) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    run_gradcam_ray(_config(artifact, "ray_then_local"), RayOptions(concurrency=1))
    run_dir = in_workdir / "ray_then_local"
    shards = sorted((run_dir / RESULTS_DIR).glob("part-*.parquet"))
    lost = [shards[0], shards[-1]]  # committed by Ray, then lost
    lost_paths = {p for shard in lost for p in pq.read_table(shard, columns=["path"]).column("path").to_pylist()}
    for shard in lost:
        shard.unlink()

    summary = run_gradcam(_config(artifact, "ray_then_local"))
    assert (summary.processed, summary.skipped_resume) == (len(lost_paths), 50 - len(lost_paths))
    assert (summary.images, summary.ok, summary.errors) == (50, 47, 3)
    rows = _rows(run_dir)
    assert len(rows) == len({r["path"] for r in rows}) == 50
    _assert_same_rows(rows, _rows(local_run))
    assert json.loads((run_dir / RUN_JSON).read_text())["status"] == "complete"


def test_address_joins_a_running_cluster(ray_cluster: Any, artifact: Path, in_workdir: Path, local_run: Path) -> None:
    """A separate process given --address runs on this module's Ray: its run.json records this cluster's CPUs, which
    a Ray of its own on this machine would not have."""
    from engine_support import REPO, child_env

    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "gradcam_engine.cli", "run", str(artifact), "images", "shard.tar",
                           "--out", "joined", "--runner", "ray", "--address", address, "--concurrency", "1",
                           "--batch-size", "8"], cwd=in_workdir, env={**child_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "50 images: 47 ok, 3 errors" in done.stdout
    ray_info = json.loads((in_workdir / "joined" / RUN_JSON).read_text())["ray"]
    assert ray_info["address"] == address
    assert ray_info["cluster"]["CPU"] == CLUSTER_CPUS != os.cpu_count()
    _assert_same_rows(_rows(in_workdir / "joined"), _rows(local_run))


class _Cluster:
    """Stands in for the ray module where actor_pool reads it: cluster resources given, Ray Data's real strategy."""

    def __init__(self, **resources: float):
        import ray.data

        self.resources, self.data = resources, ray.data

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_default_concurrency_is_one_replica_per_gpu_share_or_an_autoscaling_pool_up_to_half_the_cpus(
        ray_cluster: Any) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, actor_pool

    def sizes(cluster: Any, options: RayOptions) -> tuple[int, int]:
        pool = actor_pool(cluster, options)
        return pool.min_size, pool.max_size

    assert sizes(_Cluster(CPU=16), RayOptions()) == (1, 8)
    assert sizes(_Cluster(CPU=16), RayOptions(num_cpus_per_worker=2)) == (1, 4)
    assert sizes(_Cluster(CPU=16, GPU=2), RayOptions(num_gpus_per_worker=0.5)) == (4, 4)
    assert sizes(_Cluster(CPU=16, GPU=2), RayOptions(concurrency=3)) == (3, 3)
    assert sizes(_Cluster(CPU=1), RayOptions()) == (1, 1)
    assert sizes(ray_cluster, RayOptions()) == (1, CLUSTER_CPUS // 2)  # the live cluster, read as a run reads it


def test_ray_runner_from_the_command_line(ray_cluster: Any, artifact: Path, in_workdir: Path, local_run: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    code = main(["run", str(artifact), "images", "shard.tar", "--out", "cli_run", "--runner", "ray",
                 "--concurrency", "1", "--num-cpus-per-worker", "1", "--batch-size", "8"])
    assert code == 0, capsys.readouterr().err
    assert "50 images: 47 ok, 3 errors" in capsys.readouterr().out
    local = _rows(local_run)
    _assert_same_rows(_rows(in_workdir / "cli_run"), local)


def test_stages_without_ray_give_the_local_rows(artifact: Path, in_workdir: Path, local_run: Path) -> None:
    """The stage functions on plain dicts, in one process: what Ray runs, minus Ray."""
    from gradcam_engine.engine.ray_stages import INDEX, KIND, DecodeSpec, GradCAMActor, decode_batch, write_batch
    from gradcam_engine.engine.session import SessionOptions

    items = list_inputs(["images", "shard.tar"]).items
    spec = DecodeSpec((32, 32), 1 << 20, 1 << 24, os.getcwd())
    batch = {"path": np.array([i.key for i in items], object), KIND: np.array([i.kind for i in items], object),
             INDEX: np.arange(len(items))}
    rows = GradCAMActor(str(artifact), SessionOptions(device="cpu", threads=1), -1)(decode_batch(batch, spec))
    from gradcam_engine.engine.ray_stages import CommitSpec
    from gradcam_engine.engine.runlock import RunLock

    stages = in_workdir / "stages"
    stages.mkdir()
    lock = RunLock(stages)  # a writer task commits only under its driver's lock
    lock.acquire()
    commit = CommitSpec(str(stages), str(stages / RESULTS_DIR), str(stages / ".staging"), str(stages / OVERLAY_DIR),
                        "attempt", lock.token())
    written = write_batch(rows, commit, int(OVERLAYS), spec)
    lock.release()
    assert written["shard"][0].startswith("part-attempt-") and written["rows"].tolist() == [50]
    _assert_same_rows(_rows(in_workdir / "stages"), _rows(local_run))
    assert sorted(os.listdir(in_workdir / "stages" / OVERLAY_DIR)) == sorted(os.listdir(local_run / OVERLAY_DIR))


def test_replica_setup_error_is_one_line_and_writes_nothing(ray_cluster: Any, artifact: Path,
                                                            in_workdir: Path) -> None:
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    config = _config(artifact, "fp16_run")
    config = replace(config, session=replace(config.session, precision="fp16"))  # the artifact is fp32 only
    with pytest.raises(RunError, match="no fp16 file"):
        run_gradcam_ray(config, RayOptions(concurrency=1))
    assert not (in_workdir / "fp16_run").exists()


def test_replicas_that_take_every_cpu_are_refused_not_left_to_hang(ray_cluster: Any, artifact: Path,
                                                                    in_workdir: Path) -> None:
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    with pytest.raises(RunError, match=f"leave none of the Ray cluster's {CLUSTER_CPUS} CPUs"):
        run_gradcam_ray(_config(artifact, "greedy"), RayOptions(num_cpus_per_worker=CLUSTER_CPUS))
    with pytest.raises(RunError, match=f"{CLUSTER_CPUS} replica"):
        run_gradcam_ray(_config(artifact, "greedy"), RayOptions(concurrency=CLUSTER_CPUS))
    assert not (in_workdir / "greedy").exists()


def test_ray_flags_need_the_ray_runner(artifact: Path, in_workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    assert main(["run", str(artifact), "images", "--out", "never", "--address", "auto"]) == 2
    assert "--address needs --runner ray" in capsys.readouterr().err
    assert not (in_workdir / "never").exists()


def test_contradictory_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    from gradcam_engine.engine.errors import RunError
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    config = RunConfig(artifact="unused", inputs=["unused"], out=str(tmp_path / "out"),
                       session=SessionOptions(device="cuda"))
    with pytest.raises(RunError, match="num-gpus-per-worker"):
        run_gradcam_ray(config, RayOptions())
    with pytest.raises(RunError, match="drop --num-gpus-per-worker"):
        run_gradcam_ray(replace(config, session=SessionOptions(device="cpu")), RayOptions(num_gpus_per_worker=1))
    with pytest.raises(RunError, match="--concurrency"):
        run_gradcam_ray(replace(config, session=SessionOptions(device="auto")), RayOptions(concurrency=0))
    assert not (tmp_path / "out").exists()


def test_local_runner_and_cli_never_import_ray() -> None:
    code = ("import sys, gradcam_engine.engine.local_run, gradcam_engine.cli.main, gradcam_engine.engine.ray_run; "
            "loaded = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_tasks_read_uris_as_named_not_relative_to_the_driver(in_workdir: Path, tmp_path: Path) -> None:
    """A worker joins relative local paths to the driver's directory; a URI names its store and is read as is."""
    from gradcam_engine.engine.inputs import IMAGE
    from gradcam_engine.engine.ray_stages import DecodeSpec, load_key

    image = next(p for p in sorted((in_workdir / "images").iterdir()) if p.suffix == ".png")
    key = image.resolve().as_uri()
    loaded = load_key(key, IMAGE, DecodeSpec((32, 32), 1 << 20, 1 << 24, str(tmp_path)), keep_original=False)
    assert loaded.key == key and loaded.error is None and loaded.image is not None
    assert loaded.image.pixels.shape == (32, 32, 3)
