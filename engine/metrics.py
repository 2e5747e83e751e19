"""Scores of heatmaps and predictions against ground truth, as pure numpy over whole arrays.

Boxes: the pointing game (the CAM's peak inside a box), the energy-based pointing game (share of the CAM's mass
inside the boxes, Wang et al. 2020, Score-CAM) and the IoU of the CAM thresholded at 0.5 with the union of the boxes.
Labels: the confusion matrix, precision and recall. Faithfulness: the area under a perturbation curve (Petsiuk et al.
2018), Average Drop and Increase in Confidence (Chattopadhay et al. 2018).

A CAM is compared with boxes as the overlay shows it: upsampled bilinearly (engine.overlay's taps) to the image's
original size, without ever materialising the upsampled map. The mass inside a rectangle is separable,
(row weights) @ cam @ (column weights); the thresholded area is counted per row and per run of columns that blend
the same two CAM cells, where the upsampled row is monotone, so each (row, run) holds one interval of hot pixels.
Work per image grows with its height times the CAM's width, not with its pixel count.

Boxes of many images travel as one flat array: `boxes` float [M, 4] (x0, y0, x1, y1 in original pixels, x1 and y1
exclusive) and `owner` int [M], the image each box belongs to; an image may own any number of boxes, or none.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gradcam_engine.engine.overlay import bilinear_matrix, bilinear_taps

IOU_THRESHOLD = 0.5
_TIE = 1e-9  # far below float32 resolution near 0.5 (3e-8), far above float64 rounding
_CHUNK_ELEMENTS = 1 << 18  # per chunk of images: temporaries that stay in cache (measured fastest of 2^16..2^22)


# --- the pointing game ------------------------------------------------------------------------------------------------

def peak_points(cams: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, has_peak) per image: the centre of the CAM's peak cell (first argmax) in the image's own pixels.

    `sizes` is int [N, 2] (width, height). A map with no positive finite value points nowhere (has_peak False).
    """
    cams = np.asarray(cams, dtype=np.float64)
    n, h, w = cams.shape
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.float64), (n, 2))
    flat = np.where(np.isfinite(cams), cams, -np.inf).reshape(n, h * w)
    peak = flat.argmax(axis=1) if n else np.zeros(0, np.int64)
    has_peak = flat[np.arange(n), peak] > 0
    row, col = np.divmod(peak, w)
    return (col + 0.5) * sizes[:, 0] / w, (row + 0.5) * sizes[:, 1] / h, has_peak


def pointing_hits(cams: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """bool [N]: the peak cell's centre lies inside one of the image's boxes (x0 <= x < x1, y0 <= y < y1)."""
    x, y, has_peak = peak_points(cams, sizes)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    owner = np.asarray(owner, dtype=np.int64)
    px, py = x[owner], y[owner]
    inside = (px >= boxes[:, 0]) & (px < boxes[:, 2]) & (py >= boxes[:, 1]) & (py < boxes[:, 3])
    hits = np.zeros(len(x), bool)
    np.logical_or.at(hits, owner, inside)
    return hits & has_peak


# --- boxes as pixel rectangles ----------------------------------------------------------------------------------------

def pixel_rects(boxes: np.ndarray, owner: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes -> int rectangles (c0, r0, c1, r1) of the pixels whose centres they hold, clipped to each image;
    empty ones are dropped. Returns (rects [R, 4], owner [R])."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    owner = np.asarray(owner, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    limit = np.concatenate([sizes[owner], sizes[owner]], axis=1)
    rects = np.clip(np.ceil(boxes - 0.5), 0, limit).astype(np.int64)
    keep = (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
    return rects[keep], owner[keep]


def union_rects(rects: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint rectangles covering the union of each image's rectangles, so areas and masses simply add up.

    One rectangle is kept as it is and two become the first plus what the second adds (up to four pieces), both for
    all images at once; three or more are cut into horizontal bands whose column intervals are merged.
    """
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    owner = np.asarray(owner, dtype=np.int64)
    if len(owner) == 0:
        return rects, owner
    order = np.argsort(owner, kind="stable")
    rects, owner = rects[order], owner[order]
    counts = np.bincount(owner)
    first = np.cumsum(counts) - counts                      # index of each image's first rect
    single = counts[owner] == 1
    pair = counts[owner] == 2
    a = rects[pair][0::2]
    b = rects[pair][1::2]
    pieces = [rects[single], a] + _minus(b, a)
    owners = [owner[single], owner[pair][0::2]] + [owner[pair][0::2]] * 4
    for image in np.flatnonzero(counts > 2):
        bands = np.array(_union_of(rects[first[image]:first[image] + counts[image]].tolist()), np.int64)
        pieces.append(bands.reshape(-1, 4))
        owners.append(np.full(len(bands), image, np.int64))
    out, out_owner = np.concatenate(pieces), np.concatenate(owners)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], out_owner[keep]


def _minus(b: np.ndarray, a: np.ndarray) -> list[np.ndarray]:
    """b minus a, row by row, as four rects (some empty): above a, below a, and left and right of a in between."""
    top, bottom = np.maximum(b[:, 1], a[:, 1]), np.minimum(b[:, 3], a[:, 3])  # rows of both (empty if none)
    above = np.stack([b[:, 0], b[:, 1], b[:, 2], np.minimum(b[:, 3], a[:, 1])], axis=1)
    below = np.stack([b[:, 0], np.maximum(b[:, 1], a[:, 3]), b[:, 2], b[:, 3]], axis=1)
    left = np.stack([b[:, 0], top, np.minimum(b[:, 2], a[:, 0]), bottom], axis=1)
    right = np.stack([np.maximum(b[:, 0], a[:, 2]), top, b[:, 2], bottom], axis=1)
    return [above, below, left, right]


def _union_of(rects: list[list[int]]) -> list[tuple[int, int, int, int]]:
    """Plain Python on a handful of rects: faster there than numpy's per-call cost."""
    edges = sorted({r[1] for r in rects} | {r[3] for r in rects})
    out: list[tuple[int, int, int, int]] = []
    for top, bottom in zip(edges[:-1], edges[1:]):
        spans = sorted((c0, c1) for c0, r0, c1, r1 in rects if r0 <= top and r1 >= bottom)
        if not spans:
            continue
        start, end = spans[0]
        for c0, c1 in spans[1:]:
            if c0 > end:
                out.append((start, top, end, bottom))
                start, end = c0, c1
            else:
                end = max(end, c1)
        out.append((start, top, end, bottom))
    return out


# --- energy and IoU against the union of the boxes --------------------------------------------------------------------

@dataclass(frozen=True)
class BoxScores:
    """Per image: pointing-game hit, share of the CAM's mass inside the boxes, IoU of the hot area with them."""

    hit: np.ndarray     # bool [N]
    energy: np.ndarray  # float64 [N]; 0 for a map with no mass
    iou: np.ndarray     # float64 [N]; 0 for a map with no hot pixel


def box_scores(cams: np.ndarray, sizes: np.ndarray, boxes: np.ndarray, owner: np.ndarray,
               threshold: float = IOU_THRESHOLD) -> BoxScores:
    """Every box metric of N images in one pass: cams float [N, h, w], sizes int [N, 2] (width, height)."""
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    n, h, w = cams.shape
    sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (n, 2))
    hits = pointing_hits(cams, sizes, boxes, owner)
    rects, rect_owner = union_rects(*pixel_rects(boxes, owner, sizes))
    energy, iou = np.zeros(n), np.zeros(n)
    for members, member_rects, local_owner in _by_size(sizes, rects, rect_owner):
        width, height = (int(v) for v in sizes[members[0]])
        energy[members] = _energy(cams[members], height, width, member_rects, local_owner)
        iou[members] = _iou(cams[members], height, width, member_rects, local_owner, threshold)
    return BoxScores(hit=hits, energy=energy, iou=iou)


def _by_size(sizes: np.ndarray, rects: np.ndarray, owner: np.ndarray):
    """(image indices, their rects, rect owners as positions among those images) per distinct image size."""
    if not len(sizes):
        return
    # One int per size (np.unique over rows sorts a structured view, several times slower).
    keys, group = np.unique(sizes[:, 0].astype(np.int64) << 32 | sizes[:, 1].astype(np.int64), return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(keys) + 1))
    position = np.empty(len(sizes), np.int64)
    rect_order = np.argsort(group[owner], kind="stable")
    rect_bounds = np.searchsorted(group[owner][rect_order], np.arange(len(keys) + 1))
    for g in range(len(keys)):
        members = order[bounds[g]:bounds[g + 1]]
        position[members] = np.arange(len(members))
        picked = rect_order[rect_bounds[g]:rect_bounds[g + 1]]
        yield members, rects[picked], position[owner[picked]]


@lru_cache(maxsize=256)
def _prefix(out_size: int, in_size: int) -> np.ndarray:
    """[out + 1, in]: row k sums the bilinear weights of output positions 0..k-1; a span's mass is a difference."""
    m = bilinear_matrix(out_size, in_size).astype(np.float64)
    return np.concatenate([np.zeros((1, in_size)), np.cumsum(m, axis=0)])


def _energy(cams: np.ndarray, height: int, width: int, rects: np.ndarray, owner: np.ndarray) -> np.ndarray:
    n, h, w = cams.shape
    py, px = _prefix(height, h), _prefix(width, w)
    total = np.einsum("h,nhw,w->n", py[height], cams, px[width])
    rows = py[rects[:, 3]] - py[rects[:, 1]]   # (R, h)
    cols = px[rects[:, 2]] - px[rects[:, 0]]   # (R, w)
    inside = np.bincount(owner, np.einsum("rh,rhw,rw->r", rows, cams[owner], cols), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.clip(inside / np.where(total > 0, total, 1.0), 0.0, 1.0), 0.0)


@dataclass(frozen=True)
class _Runs:
    """Columns of an upsampled image grouped by the pair of CAM columns they blend; the blend weight is linear in x."""

    lo: np.ndarray      # [S] CAM column of weight 1 - frac
    hi: np.ndarray      # [S] CAM column of weight frac
    start: np.ndarray   # [S] first image column of the run
    end: np.ndarray     # [S] one past its last
    offset: np.ndarray  # [S] frac(x) = slope * x + offset for unclipped x
    slope: float


@lru_cache(maxsize=256)
def _runs(out_size: int, in_size: int) -> _Runs:
    lo, hi, _ = bilinear_taps(out_size, in_size)
    starts = np.flatnonzero(np.r_[True, lo[1:] != lo[:-1]])
    ends = np.r_[starts[1:], out_size]
    slope = in_size / out_size
    return _Runs(lo=lo[starts], hi=hi[starts], start=starts, end=ends,
                 offset=0.5 * slope - 0.5 - lo[starts].astype(np.float64), slope=slope)


def _iou(cams: np.ndarray, height: int, width: int, rects: np.ndarray, owner: np.ndarray,
         threshold: float) -> np.ndarray:
    """IoU of {upsampled CAM >= threshold} with the union of the rects, counted block by block, then row by row.

    The upsampled map is a patchwork of blocks: the pixels that blend the same 2x2 CAM cells. Inside a block every
    value is a convex combination of those four cells, so a block whose four cells are all hot is hot throughout
    and one whose four are all cold is cold: both are counted whole. In a mixed block each row is g0 + frac * (g1 -
    g0) with frac non-decreasing in x (0 where clipped at the border), so its hot pixels form one interval from the
    column where it crosses the threshold to one end.
    """
    n, h, w = cams.shape
    cols, rows = _runs(width, w), _runs(height, h)
    lo_y, _, frac_y = bilinear_taps(height, h)
    # The weights engine.overlay's matrices hold (float32, as they are), so values match its upsampling exactly.
    weight_lo, weight_hi = (1.0 - frac_y).astype(np.float64), frac_y.astype(np.float64)
    # A pixel exactly at the threshold is hot (>=). That is common: a cell at 1 next to a cell at 0 blends to exactly
    # 0.5 halfway, and the solved column could fall either side of it by rounding; the slack keeps it in.
    threshold = threshold - _TIE
    hot, both = np.zeros(n), np.zeros(n)
    area = np.bincount(owner, (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1]), minlength=n).astype(float)
    block_rows, block_cols = rows.end - rows.start, cols.end - cols.start
    block_area = np.outer(block_rows, block_cols)
    # Per run of rows: the two blending weights of each of its image rows, padded to the tallest run with NaN.
    row_offset = np.arange(int(block_rows.max()))
    row_y = rows.start[:, None] + row_offset[None, :]                                 # (R, K)
    padding = row_y >= rows.end[:, None]
    row_y = np.minimum(row_y, height - 1)
    row_weights = (np.where(padding, np.nan, weight_lo[row_y]), np.where(padding, np.nan, weight_hi[row_y]))
    step = max(1, _CHUNK_ELEMENTS // max(1, len(rows.lo) * len(cols.lo) * int(block_rows.max())))
    for a in range(0, n, step):
        b = min(n, a + step)
        m = b - a
        in_chunk = (owner >= a) & (owner < b)
        r, local = rects[in_chunk], owner[in_chunk] - a                          # (Q, 4): c0, r0, c1, r1
        top, bottom = cams[a:b][:, rows.lo], cams[a:b][:, rows.hi]
        corners = [top[:, :, cols.lo], top[:, :, cols.hi], bottom[:, :, cols.lo], bottom[:, :, cols.hi]]
        hot_corners = sum((c >= threshold).astype(np.int8) for c in corners)   # (m, R, S)
        full = hot_corners == 4
        hot[a:b] = (full * block_area).sum(axis=(1, 2))
        # Blocks hot throughout, within each rect: the rows and the columns they share, multiplied.
        over_rows = np.maximum(0, np.minimum(rows.end, r[:, 3:4]) - np.maximum(rows.start, r[:, 1:2]))  # (Q, R)
        over_cols = np.maximum(0, np.minimum(cols.end, r[:, 2:3]) - np.maximum(cols.start, r[:, 0:1]))  # (Q, S)
        both[a:b] += np.bincount(local, np.einsum("qrs,qr,qs->q", full[local], over_rows, over_cols), minlength=m)
        # Mixed blocks, row by row: [blocks, rows of the tallest block]; a shorter block's extra rows have NaN weights,
        # so they are hot nowhere.
        flat = np.flatnonzero((hot_corners > 0) & (hot_corners < 4))
        image, rest = np.divmod(flat, hot_corners[0].size)
        block_row, run = np.divmod(rest, hot_corners.shape[2])
        wl, wh = row_weights[0][block_row], row_weights[1][block_row]        # (B, K)
        a_, b_, c_, d_ = (c.reshape(-1)[flat][:, None] for c in corners)
        g0 = wl * a_ + wh * c_  # the row's value at the run's two CAM columns
        g1 = wl * b_ + wh * d_
        left, right = g0 >= threshold, g1 >= threshold
        start, end = cols.start[run][:, None].astype(np.float64), cols.end[run][:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = (threshold - g0) / (g1 - g0)        # frac where the row reaches the threshold ...
        crossing -= cols.offset[run][:, None]
        crossing /= cols.slope                             # ... and the column where frac is that
        # Hot from the start where the left end is hot, else from the crossing; to the end where the right end is hot,
        # else to the crossing; nothing where both ends are cold.
        first = np.where(left, start, np.maximum(start, np.minimum(end, np.ceil(crossing))))
        last = np.where(right, end, np.maximum(start, np.minimum(end, np.floor(crossing) + 1)))
        length = np.where(left | right, np.maximum(last - first, 0), 0)
        hot[a:b] += np.bincount(image, length.sum(axis=1), minlength=m)
        # Their rows within each rect: every pair of a rect and a mixed block of its image (blocks come image by image).
        since, until = np.searchsorted(image, local, "left"), np.searchsorted(image, local, "right")
        count = until - since
        pair = np.repeat(np.arange(len(local)), count)                      # the pair's rect
        block = np.repeat(since - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
        rect = r[pair]
        cut = np.minimum(last[block], rect[:, 2:3]) - np.maximum(first[block], rect[:, 0:1])
        first_row = rows.start[block_row[block]]                            # rect rows r0..r1 are block rows
        rows_in = (row_offset >= (rect[:, 1] - first_row)[:, None]) & (row_offset < (rect[:, 3] - first_row)[:, None])
        inside = np.where(rows_in & (length[block] > 0), np.maximum(cut, 0), 0)
        both[a:b] += np.bincount(local[pair], inside.sum(axis=1), minlength=m)
    union = hot + area - both
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, both / np.where(union > 0, union, 1.0), 0.0)


# --- labels -----------------------------------------------------------------------------------------------------------

def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """int64 [classes, classes]: row = true class, column = predicted class."""
    true = np.asarray(true, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    return np.bincount(true * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def precision_recall(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class precision (of the images predicted as it) and recall (of the images that are it); NaN where a
    class was never predicted or never present, so an absent class is not scored 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    diagonal = np.diag(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(predicted > 0, diagonal / np.where(predicted > 0, predicted, 1), np.nan),
                np.where(actual > 0, diagonal / np.where(actual > 0, actual, 1), np.nan))


# --- faithfulness -----------------------------------------------------------------------------------------------------

def curve_auc(scores: np.ndarray) -> np.ndarray:
    """Area under score curves at K + 1 evenly spaced fractions 0..1 of the pixels, by trapezoids: [N, K+1] -> [N]."""
    scores = np.asarray(scores, dtype=np.float64)
    steps = scores.shape[-1] - 1
    return (scores[..., 1:] + scores[..., :-1]).sum(axis=-1) / (2.0 * steps)


def confidence_drop(full: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (drop, increase): drop = max(0, Y - O) / Y (Average Drop averages it; NaN where Y <= 0, where it
    means nothing), increase = O > Y (Increase in Confidence is its mean), for the target's score Y on the image
    and O on the image times its upsampled CAM."""
    full = np.asarray(full, dtype=np.float64)
    masked = np.asarray(masked, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        drop = np.where(full > 0, np.maximum(0.0, full - masked) / np.where(full > 0, full, 1.0), np.nan)
    return drop, masked > full
