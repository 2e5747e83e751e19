"""What a run writes: one Parquet row per input, equal to a direct call of the exported graph on the same pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.decode import decode_image
from gradcam_engine.engine.results import SCHEMA
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from gradcam_engine.engine.session import SessionOptions
from gradcam_engine.export.parity import TOLERANCES
from engine_support import (CLASS_NAMES, SmallArtifact, artifact, cam_of, lively,  # noqa: F401 (fixture)
                            results_table, rows_by_path, write_scenes)

# Sizes around, below and far from the 64x64 input, wide and tall, so resizing and JPEG draft decoding both happen.
SIZES = [(64, 64), (32, 48), (200, 120), (17, 93), (640, 480), (50, 50), (300, 301), (96, 64), (33, 33), (128, 256),
         (1024, 768), (70, 20), (65, 63), (7, 9), (400, 90), (81, 240), (64, 65), (512, 512), (45, 160), (99, 98)]
ATOL = 1e-5  # not the contract's: batching may change the float rounding of the runtime's kernels, nothing more
SCORE_TOLERANCE = TOLERANCES["fp32"]["predictions_rel_diff"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_scenes(tmp_path_factory.mktemp("scenes"), SIZES, seed=100)


@pytest.fixture(scope="module")
def onnx_run(artifact: SmallArtifact, images: list[Path],  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx_run") / "run"
    summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images[0].parent)], out=str(out),
                                    batch_size=3, shard_size=8, progress=False))
    assert (summary.images, summary.ok, summary.errors) == (len(images), len(images), 0)
    return out


def direct_outputs(artifact: SmallArtifact, path: Path, class_index: int = -1) -> dict[str, np.ndarray]:  # noqa: F811
    """The exported ONNX graph called by hand, one image at a time, on the engine's decoded pixels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact.root / C.ONNX_FILE), providers=["CPUExecutionProvider"])
    pixels = decode_image(path.read_bytes(), artifact.size).pixels[None]
    names = list(C.ENGINE_OUTPUTS)
    values = session.run(names, {C.IMAGES: pixels, C.CLASS_INDEX: np.array([class_index], np.int32)})
    return {name: value[0] for name, value in zip(names, values)}


def test_the_results_are_a_parquet_dataset_with_one_row_per_input_and_the_documented_schema(
        onnx_run: Path, images: list[Path]) -> None:
    dataset = ds.dataset(str(onnx_run / "results"), format="parquet")
    assert dataset.schema.names == SCHEMA.names
    assert dataset.schema.equals(SCHEMA)
    table = dataset.to_table()
    assert table.num_rows == len(images)
    assert sorted(table.column("path").to_pylist()) == sorted(str(p) for p in images)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("error").null_count == len(images)


def test_width_and_height_are_the_original_image_size(onnx_run: Path, images: list[Path]) -> None:
    rows = rows_by_path(onnx_run)
    for path, (w, h) in zip(images, SIZES):
        assert (rows[str(path)]["width"], rows[str(path)]["height"]) == (w, h)


def test_shards_hold_rows_in_input_order(onnx_run: Path, images: list[Path]) -> None:
    shards = sorted((onnx_run / "results").glob("part-*.parquet"))
    assert len(shards) > 1
    paths = [p for shard in shards for p in pq.read_table(shard, columns=["path"]).column("path").to_pylist()]
    assert paths == [str(p) for p in images]


def test_ok_rows_equal_a_direct_call_of_the_exported_graph_on_the_decoded_pixels(
        artifact: SmallArtifact, onnx_run: Path, images: list[Path]) -> None:  # noqa: F811
    rows = rows_by_path(onnx_run)
    cam_shape = artifact.cam_shape
    for path in images:
        row, want = rows[str(path)], direct_outputs(artifact, path)
        assert row["status"] == "ok"
        assert row["predicted_class"] == int(want[C.PREDICTIONS].argmax())
        assert row["predicted_label"] == CLASS_NAMES[row["predicted_class"]]
        assert row["predicted_score"] == pytest.approx(float(want[C.PREDICTIONS].max()), abs=ATOL)
        assert row["target_class"] == int(want[C.TARGET_CLASS]) == row["predicted_class"]
        assert row["target_score"] == pytest.approx(float(want[C.TARGET_SCORE]), abs=ATOL, rel=ATOL)
        assert (row["cam_height"], row["cam_width"]) == cam_shape
        np.testing.assert_allclose(cam_of(row), want[C.CAM], atol=ATOL, rtol=0)


def test_every_cam_is_a_real_heatmap(onnx_run: Path) -> None:
    """Guards the comparisons above against a degenerate model whose CAMs are all zero, all one or nearly flat."""
    rows = rows_by_path(onnx_run)
    alive = lively(np.stack([cam_of(row) for row in rows.values()]))
    assert alive.all(), [path for path, ok in zip(rows, alive) if not ok]


def test_the_model_predicts_several_classes_and_its_input_and_maps_are_not_square(artifact: SmallArtifact,  # noqa
                                                                                  onnx_run: Path) -> None:
    """Guards the comparisons above: a model stuck on one class would hide a predicted class or label taken from the
    wrong place, and a square input or map would hide a swap of height and width."""
    predicted = [row["predicted_class"] for row in rows_by_path(onnx_run).values()]
    assert len(set(predicted)) >= 2, predicted
    assert artifact.size[0] != artifact.size[1] and artifact.cam_shape[0] != artifact.cam_shape[1]


@pytest.mark.parametrize("target", ["2", "bird"], ids=["index", "class_name"])
def test_target_sets_the_target_class_of_every_row(artifact: SmallArtifact, images: list[Path],  # noqa: F811
                                                   tmp_path: Path, target: str) -> None:
    # One image per batch, as in the direct call: a CAM for a class the model did not pick is divided by a small
    # maximum, which magnifies the rounding differences between batch sizes beyond the 1e-5 compared here.
    out = tmp_path / "run"
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(p) for p in images[:6]], out=str(out),
                          target=target, batch_size=1, progress=False))
    rows = rows_by_path(out)
    assert len(rows) == 6
    assert {row["target_class"] for row in rows.values()} == {2}
    for path in images[:6]:
        want = direct_outputs(artifact, path, class_index=2)
        row = rows[str(path)]
        assert row["target_score"] == pytest.approx(float(want[C.TARGET_SCORE]), abs=ATOL, rel=ATOL)
        np.testing.assert_allclose(cam_of(row), want[C.CAM], atol=ATOL, rtol=0)
        # The predicted columns still describe the model's own choice.
        assert row["predicted_class"] == int(want[C.PREDICTIONS].argmax())


def test_the_tf_backend_gives_the_same_rows_as_onnx(artifact: SmallArtifact, images: list[Path],  # noqa: F811
                                                    onnx_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tf_run"
    summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(images[0].parent)], out=str(out),
                                    session=SessionOptions(backend="tf", device="cpu"), batch_size=5,
                                    progress=False))
    assert (summary.ok, summary.errors) == (len(images), 0)
    assert summary.backend.split()[0] == "tf"
    onnx_rows, tf_rows = rows_by_path(onnx_run), rows_by_path(out)
    assert onnx_rows.keys() == tf_rows.keys()
    for path, tf_row in tf_rows.items():
        onnx_row = onnx_rows[path]
        for column in ("status", "width", "height", "predicted_class", "predicted_label", "target_class",
                       "cam_height", "cam_width"):
            assert tf_row[column] == onnx_row[column], column
        for score in ("predicted_score", "target_score"):  # TensorFlow vs ONNX Runtime: the export's own check
            assert tf_row[score] == pytest.approx(onnx_row[score], abs=SCORE_TOLERANCE, rel=SCORE_TOLERANCE)
        assert np.abs(cam_of(tf_row) - cam_of(onnx_row)).max() <= TOLERANCES["fp32"]["cam_max_abs_diff"]


def test_results_are_readable_as_one_table_after_the_run(onnx_run: Path) -> None:
    table = results_table(onnx_run)
    assert table.column("cam").type == SCHEMA.field("cam").type
    lengths = [len(c) for c in table.column("cam").to_pylist()]
    assert lengths == [h * w for h, w in zip(table.column("cam_height").to_pylist(),
                                              table.column("cam_width").to_pylist())]
