"""A run over an artifact with several CAM methods: one Parquet column per method, equal to the graph's `cams`;
overlays of the method asked for; both runners; and artifacts with one method, or exported before methods existed,
give exactly today's columns; every shard names its methods in its metadata."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.engine import contract as C
from gradcam_engine.engine.artifact import file_table
from gradcam_engine.engine.decode import decode_image
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.overlay import overlay_name, overlays
from gradcam_engine.engine.results import METHODS_KEY, SCHEMA, results_schema
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import GradCAMSession, SessionOptions
from gradcam_engine.export.methods import method_names

METHODS = ("layercam", *(m for m in method_names() if m != "layercam"))  # every method; the first is not Grad-CAM
SIZES = [(48, 48), (120, 90), (33, 70), (64, 64), (200, 150), (41, 41), (90, 160), (150, 40)]  # (width, height)
BAD = ["bad_0.jpg", "bad_1.png"]  # listed last: with 2-image batches and 2-row shards, the last shard is errors only


def _model() -> Any:
    import keras

    keras.utils.set_random_seed(9)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="last_conv")(x)  # 16x16x12
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    return keras.Model(inputs, out, name="methods_run_cnn")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same model exported with six methods, with the default (Grad-CAM alone), and as an artifact from before
    methods: the default one with no `methods` in its manifest and no `cams` output in its ONNX graph."""
    import onnx

    from gradcam_engine.export import ExportOptions, export_artifact

    root = tmp_path_factory.mktemp("methods_artifacts")
    model = _model()
    export_artifact(model, root / "six", ExportOptions(preprocessing="tf", methods=METHODS,
                                                      class_names=["a", "b", "c"]))
    export_artifact(model, root / "one", ExportOptions(preprocessing="tf", class_names=["a", "b", "c"]))
    export_artifact(model, root / "layercam", ExportOptions(preprocessing="tf", methods=("layercam",),
                                                           class_names=["a", "b", "c"]))
    old = root / "old"
    shutil.copytree(root / "one", old, ignore=shutil.ignore_patterns("saved_model"))
    graph = onnx.load(str(old / C.ONNX_FILE))
    graph.graph.output.remove(next(o for o in graph.graph.output if o.name == C.CAMS))
    onnx.save(graph, str(old / C.ONNX_FILE))
    manifest = json.loads((old / C.MANIFEST).read_text())
    del manifest["methods"]
    manifest["outputs"] = [o for o in manifest["outputs"] if o["name"] != C.CAMS]
    manifest["precision"] = {C.ONNX_FILE: "fp32"}
    manifest["files"] = file_table(old, [C.ONNX_FILE])
    (old / C.MANIFEST).write_text(json.dumps(manifest))
    return {"six": root / "six", "one": root / "one", "old": old, "layercam": root / "layercam"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A path list: PNG scenes of several sizes (overlays can be recomputed exactly), then two unreadable files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("methods_inputs")
    for name in BAD:
        (folder / name).write_bytes(b"not an image")
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(scene_images(1, (h, w), seed=40 + i)[0]).save(folder / f"scene_{i}.png")
    listing = folder / "list.txt"
    listing.write_text("\n".join([str(folder / f"scene_{i}.png") for i in range(len(SIZES))]
                                 + [str(folder / n) for n in BAD]) + "\n")
    return listing


def _run(artifact: Path, inputs: Path, out: Path, **options: Any) -> Path:
    run_gradcam(RunConfig(artifact=str(artifact), inputs=[str(inputs)], out=str(out), batch_size=2, shard_size=2,
                          progress=False, session=SessionOptions(backend="onnx", device="cpu"), **options))
    return out


def _rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in ds.dataset(str(run_dir / "results"), format="parquet").to_table().to_pylist()}


def shard_methods(shard: Path) -> str:
    """The CAM methods a shard's Parquet key-value metadata names."""
    return (pq.read_schema(shard).metadata or {}).get(METHODS_KEY, b"").decode()


def _map(row: dict[str, Any], column: str) -> np.ndarray:
    return np.asarray(row[column], np.float32).reshape(row["cam_height"], row["cam_width"])


@pytest.fixture(scope="module")
def six_run(artifacts: dict[str, Path], inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(artifacts["six"], inputs, tmp_path_factory.mktemp("six") / "run", overlays="all",
                overlay_method="eigencam")


def test_results_have_cam_and_one_column_per_method_in_the_artifacts_order(six_run: Path) -> None:
    schema = ds.dataset(str(six_run / "results"), format="parquet").schema
    assert schema.names == SCHEMA.names + [f"cam_{m}" for m in METHODS]
    assert schema.equals(results_schema(METHODS))
    shards = sorted((six_run / "results").glob("part-*.parquet"))
    assert set(pq.read_table(shards[-1], columns=["status"]).column("status").to_pylist()) == {"error"}
    for shard in shards:  # the errors-only shard too
        assert pq.read_schema(shard).equals(results_schema(METHODS)), shard.name
        assert shard_methods(shard) == ",".join(METHODS), shard.name


def test_each_method_column_is_the_graphs_map_for_the_decoded_pixels(artifacts: dict[str, Path], six_run: Path,
                                                                      inputs: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts["six"] / C.ONNX_FILE), providers=["CPUExecutionProvider"])
    rows = _rows(six_run)
    scenes = [p for p in inputs.read_text().split() if Path(p).name.startswith("scene_")]
    for path in scenes:
        pixels = decode_image(Path(path).read_bytes(), (32, 32)).pixels[None]
        cams = session.run([C.CAMS], {C.IMAGES: pixels, C.CLASS_INDEX: np.array([-1], np.int32)})[0][0]
        row = rows[path]
        for i, method in enumerate(METHODS):
            np.testing.assert_allclose(_map(row, f"cam_{method}"), cams[i], atol=1e-5, err_msg=f"{path} {method}")
        np.testing.assert_array_equal(row["cam"], row[f"cam_{METHODS[0]}"])  # cam is the first method
    maps = np.stack([_map(rows[p], f"cam_{m}") for p in scenes for m in METHODS])
    assert (maps.max(axis=(1, 2)) == 1.0).mean() > 0.9 and maps.std(axis=(1, 2)).min() > 0  # real maps


def test_error_rows_have_no_maps(six_run: Path) -> None:
    rows = _rows(six_run)
    errors = [r for r in rows.values() if r["status"] == "error"]
    assert len(errors) == len(BAD)
    assert all(r["cam"] is None and all(r[f"cam_{m}"] is None for m in METHODS) for r in errors)


def _overlay_pixels(run_dir: Path) -> dict[str, np.ndarray]:
    """Overlay file name -> its pixels."""
    from PIL import Image

    files = sorted((run_dir / "overlays").glob("*.jpg"))
    return {f.name: np.asarray(Image.open(f), np.float32) for f in files}


def _as_jpeg(pixels: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)  # as engine.overlay writes them
    return np.asarray(Image.open(buffer), np.float32)


def assert_overlays_show(run_dir: Path, method: str, other: str) -> None:
    """Each overlay is the chosen method's map, from the results, on the image; clearly not the other method's."""
    from PIL import Image

    shown = _overlay_pixels(run_dir)
    rows = [r for r in _rows(run_dir).values() if r["status"] == "ok"]
    assert len(shown) == len(rows) == len(SIZES)
    for row in rows:
        image = np.asarray(Image.open(row["path"]).convert("RGB"))
        want, not_want = (_as_jpeg(overlays([image], _map(row, c)[None])[0]) for c in (f"cam_{method}",
                                                                                         f"cam_{other}"))
        got = shown[overlay_name(row["path"])]
        near, far = np.abs(got - want).mean(), np.abs(got - not_want).mean()
        assert near < 0.5 and far > 10, f"{row['path']}: {near:.2f} to {method}, {far:.2f} to {other}"


def test_overlays_show_the_method_asked_for(six_run: Path) -> None:
    assert_overlays_show(six_run, "eigencam", METHODS[0])


def test_overlays_show_the_first_method_by_default_from_the_command_line(artifacts: dict[str, Path], inputs: Path,
                                                                        tmp_path: Path) -> None:
    from gradcam_engine.cli.main import main

    out = tmp_path / "run"
    assert main(["run", str(artifacts["six"]), str(inputs), "--out", str(out), "--overlays", "all",
                 "--device", "cpu"]) == 0
    assert_overlays_show(out, METHODS[0], "eigencam")
    assert json.loads((out / "run.json").read_text())["methods"] == list(METHODS)
    assert main(["run", str(artifacts["six"]), str(inputs), "--out", str(tmp_path / "b"), "--overlays", "all",
                 "--device", "cpu", "--overlay-method", "gradcampp"]) == 0
    assert_overlays_show(tmp_path / "b", "gradcampp", METHODS[0])


def test_an_unknown_overlay_method_is_one_line_and_writes_nothing(artifacts: dict[str, Path], inputs: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from gradcam_engine.cli.main import main

    assert main(["run", str(artifacts["six"]), str(inputs), "--out", str(tmp_path / "run"), "--overlays", "all",
                 "--overlay-method", "scorecam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gradcam run: error: --overlay-method scorecam: the artifact has no such CAM method; it has "
                   f"{', '.join(METHODS)} (gradcam export --methods chooses them)")
    assert not (tmp_path / "run").exists()
    assert main(["run", str(artifacts["old"]), str(inputs), "--out", str(tmp_path / "old"),
                 "--overlay-method", "layercam"]) == 2
    assert "it has gradcam " in capsys.readouterr().err


def test_another_overlay_method_on_the_same_run_directory_is_refused(artifacts: dict[str, Path], inputs: Path,
                                                                     tmp_path: Path) -> None:
    from gradcam_engine.engine.errors import RunError

    _run(artifacts["six"], inputs, tmp_path / "run", overlays="2", overlay_method="layercam")
    with pytest.raises(RunError, match="overlay_method"):
        _run(artifacts["six"], inputs, tmp_path / "run", overlays="2", overlay_method="hirescam")


@pytest.mark.parametrize("kind", ["one", "old"])
def test_one_method_and_pre_methods_artifacts_give_todays_columns(artifacts: dict[str, Path], inputs: Path,
                                                                  tmp_path: Path, kind: str) -> None:
    session = GradCAMSession(artifacts[kind], SessionOptions(backend="onnx", device="cpu"))
    assert session.artifact.methods == ("gradcam",)
    out = session({C.IMAGES: scene_images(2, (32, 32), 5)})
    assert set(out) == set(C.ENGINE_OUTPUTS)  # `cams` is not fetched (the old graph has none)
    run_dir = _run(artifacts[kind], inputs, tmp_path / "run", overlays="all")
    schema = ds.dataset(str(run_dir / "results"), format="parquet").schema
    assert schema.equals(SCHEMA) and schema.names == SCHEMA.names
    rows = [r for r in _rows(run_dir).values() if r["status"] == "ok"]
    assert len(rows) == len(SIZES) and len(list((run_dir / "overlays").glob("*.jpg"))) == len(SIZES)
    assert {shard_methods(s) for s in (run_dir / "results").glob("part-*.parquet")} == {"gradcam"}


def test_a_run_with_one_other_method_names_it_in_every_shard(artifacts: dict[str, Path], inputs: Path,
                                                              six_run: Path, tmp_path: Path) -> None:
    """Without `cam_<method>` columns, the shard's metadata is what says that `cam` holds LayerCAM's maps."""
    run_dir = _run(artifacts["layercam"], inputs, tmp_path / "run")
    assert ds.dataset(str(run_dir / "results"), format="parquet").schema.names == SCHEMA.names
    shards = sorted((run_dir / "results").glob("part-*.parquet"))
    assert len(shards) > 1 and {shard_methods(s) for s in shards} == {"layercam"}
    six = _rows(six_run)
    for path, row in _rows(run_dir).items():
        if row["status"] == "ok":
            np.testing.assert_allclose(row["cam"], six[path]["cam_layercam"], atol=1e-5)


def test_a_one_method_run_gives_the_same_gradcam_as_the_six_method_run(artifacts: dict[str, Path], inputs: Path,
                                                                       six_run: Path, tmp_path: Path) -> None:
    one = _rows(_run(artifacts["old"], inputs, tmp_path / "run"))
    six = _rows(six_run)
    for path, row in one.items():
        if row["status"] == "ok":
            np.testing.assert_allclose(row["cam"], six[path]["cam_gradcam"], atol=1e-5)


# --- Ray ----------------------------------------------------------------------------------------------------------
def test_the_ray_runner_writes_the_same_method_columns_and_overlays(ray_cluster: Any, artifacts: dict[str, Path],
                                                                    inputs: Path, six_run: Path,
                                                                    tmp_path: Path) -> None:
    from gradcam_engine.engine.ray_run import RayOptions, run_gradcam_ray

    out = tmp_path / "ray"
    run_gradcam_ray(RunConfig(artifact=str(artifacts["six"]), inputs=[str(inputs)], out=str(out), batch_size=2,
                              shard_size=2, progress=False, overlays="all", overlay_method="eigencam",
                              session=SessionOptions(threads=1)), RayOptions(concurrency=1))
    schema = ds.dataset(str(out / "results"), format="parquet").schema
    assert schema.equals(results_schema(METHODS))
    assert {shard_methods(s) for s in (out / "results").glob("part-*.parquet")} == {",".join(METHODS)}
    ray_rows, local_rows = _rows(out), _rows(six_run)
    assert set(ray_rows) == set(local_rows)
    for path, row in ray_rows.items():
        for column in ["cam", *(f"cam_{m}" for m in METHODS)]:
            if row["status"] == "ok":
                np.testing.assert_allclose(row[column], local_rows[path][column], atol=1e-5)
            else:
                assert row[column] is None
    assert_overlays_show(out, "eigencam", METHODS[0])
    assert json.loads((out / "run.json").read_text())["methods"] == list(METHODS)
