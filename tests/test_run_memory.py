"""Memory stays flat however many images a run streams: every stage is bounded, so ten times the images must not
mean more peak memory."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine_support import SmallArtifact, artifact, encode, measured_run, scene  # noqa: F401 (fixture)

SMALL, LARGE = 200, 2000


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two folders of 48x48 JPEGs: the first SMALL images, and all LARGE of them."""
    root = tmp_path_factory.mktemp("memory")
    large, small = root / "large", root / "small"
    large.mkdir()
    small.mkdir()
    for i in range(LARGE):
        (large / f"img_{i:05d}.jpg").write_bytes(encode(scene(48, 48, i), "JPEG", quality=85))
    for path in sorted(large.iterdir())[:SMALL]:
        shutil.copy(path, small / path.name)
    return small, large


def test_peak_memory_of_2000_images_is_within_15_percent_of_200_images(artifact: SmallArtifact,  # noqa: F811
                                                                       image_sets: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    small, large = image_sets
    few = measured_run(artifact.root, tmp_path / "few", [str(small)], timeout=180)
    many = measured_run(artifact.root, tmp_path / "many", [str(large)], timeout=180)
    assert (few["images"], few["ok"]) == (SMALL, SMALL)
    assert (many["images"], many["ok"]) == (LARGE, LARGE)
    ratio = many["vmhwm_kb"] / few["vmhwm_kb"]
    assert ratio <= 1.15, (f"peak RSS {many['vmhwm_kb'] / 1024:.0f} MB for {LARGE} images vs "
                           f"{few['vmhwm_kb'] / 1024:.0f} MB for {SMALL}")
