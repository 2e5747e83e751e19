"""A head given as an opaque TensorFlow callable: TensorFlow differentiates it, per image in a loop or over the whole
batch, whichever converts into an ONNX graph that ONNX Runtime loads, runs and agrees with TensorFlow on; when neither
does, export refuses, naming why, and writes nothing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from gradcam_engine.bench.contenders.reference import ReferenceParts, gradcam_reference
from gradcam_engine.bench.measure.images import scene_images
from gradcam_engine.engine import contract as C
from gradcam_engine.export.parity import TOLERANCES
from engine_support import lively

SIZE = (24, 40)
FEATURES = (12, 20, 12)  # the backbone's feature maps (h, w, C)
CAM_TOLERANCE = TOLERANCES["fp32"]["cam_max_abs_diff"]
PREDICTION_TOLERANCE = TOLERANCES["fp32"]["predictions_rel_diff"]


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    """A small backbone and two opaque heads: flatten + matmul (whose batched TensorFlow gradient tf2onnx converts,
    and whose per-image loop it does not) and a global mean + matmul (the other way round)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    inputs = keras.Input((*SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    backbone = keras.Model(inputs, keras.layers.Conv2D(FEATURES[2], 3, padding="same", activation="relu")(x))
    rng = np.random.default_rng(0)
    flat = tf.constant(rng.normal(0, 0.02, (int(np.prod(FEATURES)), 3)).astype(np.float32))
    pooled = tf.constant(rng.normal(0, 1, (FEATURES[2], 3)).astype(np.float32))
    return {"backbone": backbone,
            "flatten_head": lambda fm: tf.matmul(tf.reshape(fm, [-1, int(np.prod(FEATURES))]), flat),
            "mean_head": lambda fm: tf.matmul(tf.reduce_mean(fm, axis=[1, 2]), pooled)}


def export(parts: dict[str, Any], head: str, out: Path) -> dict[str, Any]:
    from gradcam_engine.export import ExportOptions, export_artifact

    return export_artifact((parts["backbone"], parts[head]), out, ExportOptions(input_size=SIZE))


def reference(parts: dict[str, Any], head: Callable, images: np.ndarray, class_index: np.ndarray) -> dict:
    return gradcam_reference(images, class_index, ReferenceParts(preprocess=lambda x: x,
                                                                 backbone=lambda x: parts["backbone"](x), head=head))


@pytest.mark.parametrize("head, gradient", [("flatten_head", "batched"), ("mean_head", "per_image")])
def test_a_callable_head_exports_and_matches_the_reference_in_onnx_and_tensorflow(parts: dict[str, Any],
                                                                                  tmp_path: Path, head: str,
                                                                                  gradient: str) -> None:
    import onnxruntime as ort
    import tensorflow as tf

    manifest = export(parts, head, tmp_path / "artifact")
    assert manifest["score"] == "model output" and manifest["head"] == []
    assert manifest["head_gradient"] == gradient  # the way that converted; the other one does not for this head
    assert {C.ONNX_FILE, f"{C.SAVED_MODEL_DIR}/saved_model.pb"} <= set(manifest["files"])
    assert manifest["verification"][C.ONNX_FILE]["cam_max_abs_diff"] <= CAM_TOLERANCE

    images = scene_images(6, SIZE, seed=31)
    class_index = np.array([-1, 0, -1, 2, -1, 1], np.int32)
    want = reference(parts, parts[head], images, class_index)
    assert lively(want[C.CAM]).sum() >= 5
    session = ort.InferenceSession(str(tmp_path / "artifact" / C.ONNX_FILE), providers=["CPUExecutionProvider"])
    for n in (1, 6):  # the batch stays dynamic whichever way the gradient is written
        onnx_out = dict(zip(C.ENGINE_OUTPUTS, session.run(list(C.ENGINE_OUTPUTS),
                                                          {C.IMAGES: images[:n], C.CLASS_INDEX: class_index[:n]})))
        np.testing.assert_array_equal(onnx_out[C.TARGET_CLASS], want[C.TARGET_CLASS][:n])
        assert np.abs(onnx_out[C.CAM] - want[C.CAM][:n]).max() <= CAM_TOLERANCE
    signature = tf.saved_model.load(str(tmp_path / "artifact" / C.SAVED_MODEL_DIR)).signatures[C.SIGNATURE]
    tf_out = {k: v.numpy() for k, v in signature(images=tf.constant(images),
                                                 class_index=tf.constant(class_index)).items()}
    for got in (onnx_out, tf_out):
        np.testing.assert_array_equal(got[C.TARGET_CLASS], want[C.TARGET_CLASS])
        np.testing.assert_allclose(got[C.PREDICTIONS], want[C.PREDICTIONS], rtol=PREDICTION_TOLERANCE,
                                   atol=PREDICTION_TOLERANCE)
        assert np.abs(got[C.CAM] - want[C.CAM]).max() <= CAM_TOLERANCE


def test_an_onnx_graph_that_disagrees_with_tensorflow_is_refused(parts: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion is made to come out wrong (its largest weight scaled by 1.1) whichever way the gradient is
    written: export must notice, say why for each, and write nothing."""
    from onnx import numpy_helper

    from gradcam_engine.export import ExportError
    from gradcam_engine.export import to_onnx

    convert = to_onnx.convert

    def skewed(*args: Any, **kwargs: Any) -> Any:
        proto = convert(*args, **kwargs)
        weight = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.1), weight.name))
        return proto

    monkeypatch.setattr(to_onnx, "convert", skewed)
    with pytest.raises(ExportError, match=r"per image: .*; batched: the fp32 ONNX graph disagrees with TensorFlow on "
                                          r".*refusing to write it.*pass the head as Keras layers") as refused:
        export(parts, "flatten_head", tmp_path / "artifact")
    assert "\n" not in str(refused.value)
    assert os.listdir(tmp_path) == []
