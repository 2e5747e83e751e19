"""Overlays as the seed draws them: bilinear upsampling like tf.image.resize, matplotlib's jet, 0.6 heat + 0.4 image,
written at each image's original size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_engine.engine.overlay import (HEAT_WEIGHT, IMAGE_WEIGHT, blend, jet, jet_table, overlay_name, overlays,
                                          upsample)
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from engine_support import (SmallArtifact, artifact, cam_of, rows_by_path, scene,  # noqa: F401 (fixture)
                            write_image)

# matplotlib.cm.jet(x)[:3], as matplotlib 3.x returns them (256-entry table, index int(x * 256)).
MATPLOTLIB_JET = {
    0.0: (0.0, 0.0, 0.5),
    0.125: (0.0, 0.00196078431372549, 1.0),
    0.25: (0.0, 0.503921568627451, 1.0),
    0.375: (0.08538899430740036, 1.0, 0.8823529411764706),
    0.5: (0.4901960784313725, 1.0, 0.4775458570524984),
    1.0: (0.5, 0.0, 0.0),
}


def tf_resize(cams: np.ndarray, height: int, width: int) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(cams[..., None], (height, width), method="bilinear").numpy()[..., 0]


@pytest.mark.parametrize(("source", "target"), [((7, 7), (224, 224)), ((3, 5), (37, 91)), ((16, 16), (48, 160)),
                                                ((1, 4), (9, 13)), ((16, 16), (5, 9)), ((16, 16), (1, 1))],
                         ids=lambda s: "x".join(map(str, s)))
def test_upsample_matches_tf_image_resize_bilinear(source: tuple[int, int], target: tuple[int, int]) -> None:
    cams = np.random.default_rng(sum(source + target)).random((3, *source), dtype=np.float32)
    got = upsample(cams, *target)
    assert got.shape == (3, *target)
    np.testing.assert_allclose(got, tf_resize(cams, *target), atol=1e-5, rtol=0)


def test_upsample_keeps_a_constant_cam_constant() -> None:
    got = upsample(np.full((2, 7, 7), 0.25, np.float32), 50, 70)
    np.testing.assert_allclose(got, 0.25, atol=1e-6)


@pytest.mark.parametrize("x", sorted(MATPLOTLIB_JET))
def test_jet_matches_matplotlib_at_known_points(x: float) -> None:
    np.testing.assert_allclose(jet(np.array([x])), [MATPLOTLIB_JET[x]], atol=1e-6)


def test_jet_is_a_256_entry_table_from_dark_blue_to_dark_red_and_clips_out_of_range_heat() -> None:
    table = jet_table()
    assert table.shape == (256, 3) and table.dtype == np.float32
    assert (table >= 0).all() and (table <= 1).all()
    np.testing.assert_allclose(jet(np.array([-0.5, 0.0, 1.0, 7.0, np.nan])),
                               [(0, 0, 0.5), (0, 0, 0.5), (0.5, 0, 0), (0.5, 0, 0), (0, 0, 0.5)], atol=1e-6)
    assert jet(np.zeros((2, 3, 4))).shape == (2, 3, 4, 3)


def test_blend_is_60_percent_jet_and_40_percent_image_clipped_and_rounded() -> None:
    assert (HEAT_WEIGHT, IMAGE_WEIGHT) == (0.6, 0.4)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
    heat = rng.random((2, 9, 11), dtype=np.float32)
    want = np.clip(0.6 * jet(heat) + 0.4 * images / 255.0, 0, 1) * 255
    got = blend(images, heat)
    assert got.dtype == np.uint8 and got.shape == images.shape
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-3
    # Full heat on a white image: 0.6 * (0.5, 0, 0) + 0.4 = (0.7, 0.4, 0.4), i.e. (178.5, 102, 102), rounded half up.
    white = blend(np.full((1, 1, 1, 3), 255, np.uint8), np.ones((1, 1, 1), np.float32))
    assert white[0, 0, 0].tolist() == [179, 102, 102]
    # Over-bright sums are clipped, not wrapped: 0.6 * jet(0.5) + 0.4 * white exceeds 1 in green.
    assert blend(np.full((1, 1, 1, 3), 255, np.uint8), np.full((1, 1, 1), 0.5, np.float32))[0, 0, 0, 1] == 255


def test_overlays_are_at_each_image_size_whatever_the_mix_of_sizes() -> None:
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(30, 40), (7, 3), (30, 40), (1, 1)]]
    cams = rng.random((4, 5, 5), dtype=np.float32)
    out = overlays(images, cams)
    assert [o.shape for o in out] == [im.shape for im in images]
    for image, cam, overlay in zip(images, cams, out):
        np.testing.assert_array_equal(overlay, blend(image[None], upsample(cam[None], *image.shape[:2]))[0])


# --- overlays written by a run --------------------------------------------------------------------------------------

def grey_scene(width: int, height: int, seed: int) -> np.ndarray:
    """Structured but colourless, so any colour in its overlay comes from the heat map."""
    grey = scene(width, height, seed).mean(axis=2).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def overlay_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "overlays").glob("*.jpg"))


def test_overlays_all_writes_one_jpeg_per_ok_image_at_its_original_size(artifact: SmallArtifact,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    folder = tmp_path / "images"
    sizes = {"a_wide.png": (160, 90), "b_small.jpg": (20, 30), "c_big.jpg": (700, 500), "d_one.png": (1, 1)}
    for name, (w, h) in sizes.items():
        write_image(folder / name, scene(w, h, len(name) + w))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120 wide and 50 high, shown rotated: 50 wide, 120 high
    Image.fromarray(scene(120, 50, 9)).save(folder / "e_rotated.jpg", quality=90, exif=exif)
    sizes["e_rotated.jpg"] = (50, 120)
    (folder / "f_broken.jpg").write_bytes(b"not an image")

    summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(folder)], out=str(tmp_path / "run"),
                                    overlays="all", batch_size=2, progress=False))
    assert (summary.ok, summary.errors) == (5, 1)
    assert "overlays" in summary.text()
    files = overlay_files(tmp_path / "run")
    assert [f.name for f in files] == sorted(overlay_name(str(folder / name)) for name in sizes)
    rows = rows_by_path(tmp_path / "run")
    for name in sorted(sizes):
        file = tmp_path / "run" / "overlays" / overlay_name(str(folder / name))
        with Image.open(file) as overlay:
            assert overlay.format == "JPEG"
            assert overlay.size == sizes[name], name
        row = rows[str(folder / name)]
        assert (row["width"], row["height"]) == sizes[name]


def test_overlays_n_writes_overlays_for_exactly_the_first_n_inputs(artifact: SmallArtifact,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for i in range(5):
        write_image(folder / f"img_{i}.png", scene(40 + i, 30 + i, 20 + i))
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(folder)], out=str(tmp_path / "run"),
                          overlays="2", batch_size=3, progress=False))
    assert [f.name for f in overlay_files(tmp_path / "run")] == sorted(
        overlay_name(str(folder / f"img_{i}.png")) for i in range(2))
    assert len(rows_by_path(tmp_path / "run")) == 5


def test_the_hottest_region_of_an_overlay_is_where_the_cam_peaks(artifact: SmallArtifact,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    width, height = 200, 150
    pixels = grey_scene(width, height, 31)
    path = write_image(tmp_path / "grey.png", pixels)
    run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(path)], out=str(tmp_path / "run"),
                          overlays="all", progress=False))
    cam = cam_of(rows_by_path(tmp_path / "run")[str(path)])
    assert cam.max() == pytest.approx(1.0) and cam.min() < 0.2, "the CAM needs a peak and a cold region"
    heat = upsample(cam[None], height, width)[0]
    with Image.open(overlay_files(tmp_path / "run")[0]) as file:
        overlay = np.asarray(file.convert("RGB"), np.float32)

    # The whole overlay is the blend of this CAM over this image, up to JPEG loss.
    assert np.abs(overlay - blend(pixels[None], heat[None])[0]).mean() < 3.0

    # On a colourless image red minus blue is the heat map's own: +0.3 at the peak (dark red), -0.3 where cold.
    def red_minus_blue(y: int, x: int) -> float:
        patch = overlay[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
        return float((patch[..., 0] - patch[..., 2]).mean()) / 255

    hot = np.unravel_index(heat.argmax(), heat.shape)
    cold = np.unravel_index(heat.argmin(), heat.shape)
    assert red_minus_blue(*hot) > 0.2
    assert red_minus_blue(*cold) < -0.2
