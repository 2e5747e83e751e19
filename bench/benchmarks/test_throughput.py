"""Throughput of each contender with pytest-benchmark: `pytest bench/ --benchmark-only`.

One benchmark per contender and batch size; a round is one batch. Compare groups with pytest-benchmark's own tools
(`--benchmark-group-by=group`, `--benchmark-save`, `--benchmark-compare`). `gradcam bench` gives the alternated,
side-by-side figures and the targets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradcam_engine.engine import contract as C

ROUNDS = 5
MODEL_CONTENDERS = [("gradcam", "onnx"), ("forward", "onnx"), ("gradcam", "tf"), ("forward", "tf"),
                    ("gradcam", "tf-xla"), ("forward", "tf-xla")]


def _find(suite, kind: str, backend: str):
    """The built contender of that kind on that runtime family (any device); skip only one this model does not call
    for (forward-only needs a Keras model), fail one that was called for but is missing."""
    for c in suite.contenders.values():
        if c.kind == kind and c.runtime.rsplit("-", 1)[0] == backend and c.precision == "fp32":
            return c
    if any(s.kind == kind and s.backend == backend for s in suite.requested):
        pytest.fail(f"{kind} {backend}: requested but not built (see the suite's log)")
    pytest.skip(f"{kind} {backend}: not part of this run (an artifact directory has no Keras model)")


def _per_second(benchmark, images: int) -> None:
    if benchmark.stats:
        benchmark.extra_info["images_per_second"] = images / benchmark.stats.stats.median


def test_contenders_agree_with_the_reference(suite) -> None:
    """Also enforced by the suite itself, so that --benchmark-only (which skips this test) times no wrong contender."""
    bad = [c for c in suite.checks if not c["ok"]]
    assert not bad, bad


@pytest.mark.parametrize("kind,backend", MODEL_CONTENDERS, ids=[f"{k}-{b}" for k, b in MODEL_CONTENDERS])
def test_model(benchmark, suite, kind: str, backend: str, batch_size: int) -> None:
    contender = _find(suite, kind, backend)
    images = suite.images[:batch_size]
    class_index = np.full(len(images), -1, np.int32)
    benchmark.group = f"batch {batch_size}"
    out = benchmark.pedantic(contender.call, args=(images, class_index), rounds=ROUNDS, warmup_rounds=1)
    assert out[C.PREDICTIONS].shape[0] == len(images)
    _per_second(benchmark, len(images))


def test_reference_one_image(benchmark, suite) -> None:
    contender = next((c for c in suite.contenders.values() if c.kind == "reference"), None)
    if contender is None:
        pytest.skip("no reference: the model is an artifact directory without its Keras model")
    benchmark.group = "batch 1"
    out = benchmark.pedantic(contender.call, args=(suite.images[:1], np.full(1, -1, np.int32)), rounds=ROUNDS,
                             warmup_rounds=1)
    assert out[C.CAM].shape[0] == 1
    _per_second(benchmark, 1)


def test_end_to_end_jpeg_to_parquet(benchmark, suite, tmp_path: Path) -> None:
    from gradcam_engine.bench.measure.e2e import run_config
    from gradcam_engine.bench.measure.images import jpeg_set, path_list
    from gradcam_engine.engine.local_run import run_gradcam
    from gradcam_engine.engine.session import GradCAMSession, SessionOptions

    paths = jpeg_set(suite.work / "images", len(suite.images))
    config = run_config(suite.artifact.root, path_list(paths, tmp_path / "inputs.txt"), tmp_path / "run",
                        len(suite.images), "onnx", "cpu")
    session = GradCAMSession(suite.artifact, SessionOptions(backend="onnx", device="cpu"))
    benchmark.group = "end to end"
    summary = benchmark.pedantic(run_gradcam, args=(config,), kwargs={"session": session}, rounds=ROUNDS,
                                 warmup_rounds=1)
    assert summary.ok == len(paths)
    _per_second(benchmark, len(paths))
