"""The metric functions, against the slow obvious computation: every pixel of the upsampled CAM (engine.overlay's
own upsample), box masks drawn pixel by pixel, and the demo's pointing game."""
from __future__ import annotations

import numpy as np
import pytest

from gradcam_engine.demo.scenes import pointing_hits as demo_pointing_hits
from gradcam_engine.engine.metrics import (box_scores, confidence_drop, confusion_matrix, curve_auc, pixel_rects,
                                           pointing_hits, precision_recall, union_rects)
from gradcam_engine.engine.overlay import bilinear_matrix, upsample


def smooth_cams(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """CAM-like maps: a few blobs, ReLU, divided by the max (some all zero), as the graph returns them."""
    coarse = rng.normal(size=(n, 3, 3)).astype(np.float32)
    cams = np.maximum(upsample(coarse, h, w) + 0.15 * rng.normal(size=(n, h, w)), 0)
    peak = cams.reshape(n, -1).max(axis=1)
    cams = cams / np.where(peak > 0, peak, 1)[:, None, None]
    cams[::7] = 0.0
    return cams.astype(np.float32)


def box_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies in any box (x0 <= x + 0.5 < x1), drawn one box at a time."""
    yc = np.arange(height)[:, None] + 0.5
    xc = np.arange(width)[None, :] + 0.5
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xc >= x0) & (xc < x1) & (yc >= y0) & (yc < y1)
    return mask


def brute_force(cams: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, owner: np.ndarray,
                exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Energy and IoU from the full upsampled map of each image (float64 products of the same matrices if exact)."""
    energy, iou = [], []
    for i, (width, height) in enumerate(sizes):
        if exact:
            heat = (bilinear_matrix(int(height), cams.shape[1]).astype(np.float64) @ cams[i].astype(np.float64)
                    @ bilinear_matrix(int(width), cams.shape[2]).astype(np.float64).T)
        else:
            heat = upsample(cams[i:i + 1], int(height), int(width))[0].astype(np.float64)
        mask = box_mask(boxes[owner == i], int(width), int(height))
        total = heat.sum()
        energy.append(heat[mask].sum() / total if total > 0 else 0.0)
        hot = heat >= 0.5
        union = (hot | mask).sum()
        iou.append((hot & mask).sum() / union if union else 0.0)
    return np.array(energy), np.array(iou)


@pytest.mark.parametrize("cam_shape", [(7, 7), (12, 12), (3, 5), (16, 16), (1, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_and_iou_equal_a_pixel_by_pixel_count_on_the_upsampled_map(cam_shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(cam_shape))
    n = 30
    cams = smooth_cams(rng, n, *cam_shape)
    cams[1] = rng.random(cam_shape)  # a rough map: the threshold crosses in most runs of columns
    sizes = np.stack([rng.integers(4, 260, n), rng.integers(4, 260, n)], axis=1)
    sizes[::4] = sizes[0]  # several images share a size (one vectorised group)
    sizes[2] = (cam_shape[1] // 2 + 1, cam_shape[0] // 2 + 1)  # smaller than the CAM: a downsampling
    owner = np.concatenate([np.arange(n), rng.integers(0, n, 25)])  # some images have several boxes
    wh = sizes[owner]
    x0 = rng.uniform(-30, wh[:, 0], len(owner))
    y0 = rng.uniform(-30, wh[:, 1], len(owner))
    boxes = np.stack([x0, y0, x0 + rng.uniform(0, 220, len(owner)), y0 + rng.uniform(0, 220, len(owner))], axis=1)
    boxes[::3] = np.round(boxes[::3])  # integer corners as well as fractional ones
    keep = np.ones(len(owner), bool)
    keep[[o for o in range(len(owner)) if owner[o] == 5]] = False  # image 5 has no box at all
    boxes, owner = boxes[keep], owner[keep]

    got = box_scores(cams, sizes, boxes, owner)
    energy, iou = brute_force(cams, sizes, boxes, owner)

    assert 0 < iou.mean() < 1 and 0 < energy.mean() < 1  # the cases are not trivial
    np.testing.assert_allclose(got.energy, energy, atol=1e-6)
    np.testing.assert_allclose(got.iou, iou, atol=1e-6)
    assert got.energy[5] == got.iou[5] == 0 and not got.hit[5]


def test_a_pixel_exactly_at_the_threshold_is_hot() -> None:
    """A cell at 1 next to a cell at 0 blends to exactly 0.5 halfway: such pixels count (>= 0.5), every time."""
    cams = np.zeros((1, 1, 4), np.float32)
    cams[0, 0, 1] = 1.0
    sizes = np.array([[126, 3]])
    boxes = np.array([[0.0, 0.0, 63.0, 3.0]])
    got = box_scores(cams, sizes, boxes, np.array([0]))
    _, iou = brute_force(cams, sizes, boxes, np.array([0]), exact=True)
    heat = bilinear_matrix(126, 4).astype(np.float64) @ cams[0, 0].astype(np.float64)
    assert (heat == 0.5).any()
    np.testing.assert_allclose(got.iou, iou, atol=1e-12)


def test_iou_is_one_when_the_hot_area_is_the_box() -> None:
    cam = np.zeros((1, 8, 8), np.float32)
    cam[0, 2:6, 1:5] = 1.0  # at its own size, no interpolation: hot exactly on the box
    got = box_scores(cam, np.array([[8, 8]]), np.array([[1, 2, 5, 6]]), np.array([0]))
    assert got.iou[0] == 1.0 and got.energy[0] == 1.0 and got.hit[0]
    got = box_scores(cam, np.array([[8, 8]]), np.array([[5, 0, 8, 2]]), np.array([0]))
    assert got.iou[0] == 0.0 and got.energy[0] == 0.0 and not got.hit[0]


def test_overlapping_boxes_count_their_union_once() -> None:
    rng = np.random.default_rng(4)
    cams = smooth_cams(rng, 6, 7, 7)
    cams[0] = 0.9
    sizes = np.tile([[120, 90]], (6, 1))
    single = np.array([[10, 10, 80, 60]] * 6, float)
    twice = np.concatenate([single, single, [[30, 20, 70, 50]] * 6])  # the same box twice, plus one inside it
    a = box_scores(cams, sizes, single, np.arange(6))
    b = box_scores(cams, sizes, twice, np.tile(np.arange(6), 3))
    np.testing.assert_allclose(b.energy, a.energy, atol=1e-12)
    np.testing.assert_allclose(b.iou, a.iou, atol=1e-12)
    np.testing.assert_array_equal(b.hit, a.hit)


@pytest.mark.parametrize("per_image", [1, 2, 3, 10])
def test_the_union_of_rects_covers_exactly_their_pixels_with_disjoint_pieces(per_image: int) -> None:
    rng = np.random.default_rng(5 + per_image)
    images = 60
    corners = rng.integers(0, 40, (images * per_image, 2))
    rects = np.concatenate([corners, corners + rng.integers(1, 25, corners.shape)], axis=1)
    owner = rng.permutation(np.repeat(np.arange(images), per_image))  # in any order
    pieces, piece_owner = union_rects(rects, owner)
    for image in range(images):
        expected = np.zeros((70, 70), int)
        for c0, r0, c1, r1 in rects[owner == image]:
            expected[r0:r1, c0:c1] = 1
        covered = np.zeros((70, 70), int)
        for c0, r0, c1, r1 in pieces[piece_owner == image]:
            covered[r0:r1, c0:c1] += 1
        np.testing.assert_array_equal(covered, expected)  # each pixel once: disjoint, nothing missing


def test_pixel_rects_take_the_pixels_whose_centres_the_box_holds_clipped_to_the_image() -> None:
    rects, owner = pixel_rects(np.array([[0.4, 0.6, 2.5, 3.5], [-5, -5, 200, 3], [50, 50, 60, 60]]),
                               np.array([0, 0, 0]), np.array([[100, 40]]))
    np.testing.assert_array_equal(rects, [[0, 1, 2, 3], [0, 0, 100, 3]])  # the third lies outside: dropped
    np.testing.assert_array_equal(owner, [0, 0])


def test_pointing_hits_reproduce_the_demos_pointing_game() -> None:
    rng = np.random.default_rng(6)
    n = 400
    cams = smooth_cams(rng, n, 12, 12)
    sizes = np.stack([rng.integers(20, 300, n), rng.integers(20, 300, n)], axis=1)
    x0, y0 = rng.uniform(0, sizes[:, 0] * 0.6), rng.uniform(0, sizes[:, 1] * 0.6)
    boxes = np.stack([x0, y0, x0 + sizes[:, 0] * 0.4, y0 + sizes[:, 1] * 0.4], axis=1)
    ours = pointing_hits(cams, sizes, boxes, np.arange(n))
    theirs = demo_pointing_hits(cams, boxes, sizes)
    assert 0.1 < ours.mean() < 0.9
    np.testing.assert_array_equal(ours, theirs)


def test_a_peak_inside_any_of_several_boxes_is_a_hit() -> None:
    cam = np.zeros((1, 4, 4))
    cam[0, 3, 0] = 1.0  # cell centre (12.5, 87.5) in a 100x100 image
    boxes = np.array([[50, 50, 100, 100], [0, 75, 25, 100]])
    assert pointing_hits(cam, np.array([[100, 100]]), boxes, np.array([0, 0]))[0]
    assert not pointing_hits(cam, np.array([[100, 100]]), boxes[:1], np.array([0]))[0]
    assert not pointing_hits(np.zeros((1, 4, 4)), np.array([[100, 100]]), boxes, np.array([0, 0]))[0]


def test_confusion_matrix_precision_and_recall() -> None:
    true = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 1, 1])
    matrix = confusion_matrix(true, predicted, 4)
    np.testing.assert_array_equal(matrix, [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    precision, recall = precision_recall(matrix)
    np.testing.assert_allclose(precision, [1.0, 0.5, np.nan, np.nan])  # class 2, 3 never predicted: undefined
    np.testing.assert_allclose(recall, [2 / 3, 1.0, 0.0, np.nan])      # class 3 never present: undefined


def test_curve_auc_is_the_trapezoid_over_fractions_zero_to_one() -> None:
    np.testing.assert_allclose(curve_auc(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])),
                               [1.0, 0.25, 0.5])


def test_confidence_drop_and_increase() -> None:
    drop, increase = confidence_drop(np.array([0.8, 0.5, 0.0, 0.4]), np.array([0.2, 0.6, 0.1, 0.4]))
    np.testing.assert_allclose(drop, [0.75, 0.0, np.nan, 0.0])  # Y = 0: undefined, not 0
    np.testing.assert_array_equal(increase, [False, True, True, False])


def test_a_row_cold_at_both_ends_of_a_border_run_has_no_hot_pixel() -> None:
    """At the left border the blend weight is clipped to 0: a falling row that never reaches the threshold has no hot
    pixel there, though the straight line that holds further in would cross it."""
    cam = np.array([[[0.45, 0.2], [1.0, 0.2]]], np.float32)  # the top-left block is mixed: hot at the bottom only
    sizes, boxes = np.array([[16, 16]]), np.array([[0.0, 0.0, 4.0, 4.0]])
    got = box_scores(cam, sizes, boxes, np.array([0]))
    energy, iou = brute_force(cam, sizes, boxes, np.array([0]), exact=True)
    np.testing.assert_allclose(got.iou, iou, atol=1e-12)
    np.testing.assert_allclose(got.energy, energy, atol=1e-12)


def test_scores_do_not_depend_on_how_images_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcam_engine.engine import metrics

    rng = np.random.default_rng(8)
    n = 40
    cams = smooth_cams(rng, n, 7, 7)
    sizes = np.tile([[120, 90]], (n, 1))
    owner = np.concatenate([np.arange(n), np.arange(0, n, 3)])
    x0, y0 = rng.uniform(0, 70, len(owner)), rng.uniform(0, 50, len(owner))
    boxes = np.stack([x0, y0, x0 + 40, y0 + 30], axis=1)
    whole = box_scores(cams, sizes, boxes, owner)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1)  # one image per chunk
    chunked = box_scores(cams, sizes, boxes, owner)
    np.testing.assert_array_equal(chunked.iou, whole.iou)
    np.testing.assert_array_equal(chunked.energy, whole.energy)
