"""pytest-benchmark suite setup: `pytest bench/benchmarks --benchmark-only` times the contenders `gradcam bench`
times.

Options: --bench-model (seed-resnet50, a .keras file or an artifact directory), --bench-batch-sizes, --bench-images,
--bench-work-dir. The model is exported once and cached like `gradcam bench` does; every contender is built once per
session and checked against the reference before any test times it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcam-bench")
    group.addoption("--bench-model", default="seed-resnet50", help="seed-resnet50, a .keras file or an artifact dir")
    group.addoption("--bench-batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    group.addoption("--bench-images", type=int, default=32, help="images generated (the largest batch at most)")
    group.addoption("--bench-work-dir", default=None, help="export cache (default ~/.cache/gradcam-engine/bench)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "batch_size" in metafunc.fixturenames:
        sizes = [int(b) for b in metafunc.config.getoption("--bench-batch-sizes").split(",") if b]
        metafunc.parametrize("batch_size", sizes, ids=[f"b{b}" for b in sizes])


@dataclass
class Suite:
    """What the benchmarks share: built contenders, their check results, the images and the artifact."""

    contenders: dict[str, Any]
    checks: list[dict[str, Any]]
    images: np.ndarray
    artifact: Any
    work: Path
    requested: list[Any]  # the contender specs this model and machine call for: each one was built


@pytest.fixture(scope="session")
def suite(pytestconfig: pytest.Config) -> Suite:
    from gradcam_engine.engine.artifact import load_artifact

    from gradcam_engine.bench.measure.images import scene_images
    from gradcam_engine.bench.main import build_contenders, check_contenders, contender_specs, preset
    from gradcam_engine.bench.contenders.models import default_work_dir, prepare_model

    work = Path(pytestconfig.getoption("--bench-work-dir") or default_work_dir())
    config = preset(quick=True, model=pytestconfig.getoption("--bench-model"), work_dir=str(work),
                    images=pytestconfig.getoption("--bench-images"))
    model = prepare_model(config.model, work)
    artifact = load_artifact(model.artifact)
    images = scene_images(config.images, artifact.input_size, seed=1)
    built = build_contenders(config, model, artifact, log=print)
    # A contender this machine and model call for that does not build, or that disagrees with the reference, fails
    # every benchmark: timing what is left would publish numbers with a contender silently missing or wrong.
    requested = contender_specs(config, artifact, model.keras_path is not None)
    missing = [spec for spec in requested if spec not in built.specs.values()]
    if missing:
        pytest.fail(f"contenders failed to build: {built.skipped}", pytrace=False)
    checks = check_contenders(built, images[:config.reference_images], artifact.manifest["num_classes"], log=print)
    wrong = [c for c in checks if not c["ok"]]
    if wrong:
        pytest.fail(f"contenders disagree with the reference: {wrong}", pytrace=False)
    return Suite({c.name: c for c in built.contenders}, checks, images, artifact, work / "runs" / "pytest", requested)
