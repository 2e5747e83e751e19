"""Faithfulness metrics on a model whose evidence is known: it scores the brightness of one region, so a CAM on that
region is faithful and a CAM elsewhere is not."""
from __future__ import annotations

import numpy as np

from gradcam_engine.engine.faithfulness import (BLUR_SIGMA, BLUR_TAPS, blurred, mean_colour, measure,
                                                removal_rank, removed_counts)

SIZE = 32
REGION = (slice(4, 12), slice(20, 28))  # rows, columns the toy model looks at


def region_model(calls: list[int]):
    """Score = mean brightness of REGION / 255 (for every class); counts the images it is asked to score."""
    def score(images: np.ndarray, target: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return images[:, REGION[0], REGION[1]].astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
    return score


def cam_on(rows: slice, cols: slice, h: int = 8, w: int = 8) -> np.ndarray:
    cam = np.zeros((h, w), np.float32)
    cam[rows, cols] = 1.0
    return cam


def test_a_faithful_cam_deletes_faster_and_inserts_faster_than_an_unfaithful_one() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (3, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, REGION[0], REGION[1]] = rng.integers(200, 256, (3, 8, 8, 3))  # a bright object where the model looks
    faithful = np.stack([cam_on(slice(1, 3), slice(5, 7))] * 3)    # REGION at CAM scale (4 px per cell)
    unfaithful = np.stack([cam_on(slice(5, 8), slice(0, 3))] * 3)  # far from it
    calls: list[int] = []
    got = measure(region_model(calls), images, np.zeros(3, int), {"good": faithful, "bad": unfaithful},
                  ("drop", "deletion", "insertion"), steps=8, baseline_name="mean")
    good, bad = got["good"], got["bad"]
    assert (good.deletion_auc < bad.deletion_auc - 0.1).all()
    assert (good.insertion_auc > bad.insertion_auc + 0.1).all()
    # Multiplying by the faithful map keeps the region (little drop), by the unfaithful one blacks it out.
    assert (good.drop < 0.3).all() and (bad.drop > 0.9).all()
    # Passes: the image, the baseline, then per method the masked image and K - 1 steps of each curve.
    assert sum(calls) == 3 * (2 + 2 * (1 + 2 * 7))


def test_curves_start_and_end_at_the_image_and_the_baseline() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    cams = {"m": rng.random((2, 8, 8)).astype(np.float32)}
    score = region_model([])
    got = measure(score, images, np.zeros(2, int), cams, ("deletion", "insertion"), steps=4, baseline_name="blur")["m"]
    full, base = score(images, None), score(blurred(images), None)
    np.testing.assert_allclose(got.deletion[:, 0], full)
    np.testing.assert_allclose(got.deletion[:, -1], base)
    np.testing.assert_allclose(got.insertion[:, 0], base)
    np.testing.assert_allclose(got.insertion[:, -1], full)
    assert got.deletion.shape == (2, 5) and np.isnan(got.drop).all()  # drop was not asked for


def test_pixels_are_removed_most_salient_first_with_ties_scattered() -> None:
    heat = np.zeros((1, 16, 16), np.float32)
    heat[0, 10, 3], heat[0, 2, 2], heat[0, 5, 9] = 0.9, 0.8, 0.1
    rank = removal_rank(heat).reshape(16, 16)
    assert (rank[10, 3], rank[2, 2], rank[5, 9]) == (0, 1, 2)
    assert sorted(rank.ravel()) == list(range(256))
    # The 253 zeros follow in a shuffled order, not row by row: the top rows are not removed first.
    assert rank[:4].mean() > 64
    np.testing.assert_array_equal(removed_counts(256, 8), np.arange(9) * 32)


def test_blur_baseline_is_the_rise_gaussian_and_mean_baseline_is_the_mean_colour() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (1, 20, 24, 3), dtype=np.uint8)
    x = np.arange(BLUR_TAPS) - BLUR_TAPS // 2
    kernel = np.exp(-x ** 2 / (2 * BLUR_SIGMA ** 2))
    kernel /= kernel.sum()
    padded = np.pad(image[0].astype(np.float64), ((5, 5), (5, 5), (0, 0)), mode="edge")
    expected = np.zeros((20, 24, 3))
    for dy in range(BLUR_TAPS):
        for dx in range(BLUR_TAPS):
            expected += kernel[dy] * kernel[dx] * padded[dy:dy + 20, dx:dx + 24]
    assert np.abs(blurred(image)[0].astype(int) - np.rint(expected).astype(int)).max() <= 1
    means = mean_colour(image)
    np.testing.assert_array_equal(means[0, 0, 0], np.rint(image[0].reshape(-1, 3).mean(axis=0)))
    assert (means == means[:, :1, :1]).all()
