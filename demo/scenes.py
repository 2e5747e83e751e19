"""Synthetic scenes with one shape of a known class at a known place, and the pointing game that scores heatmaps.

Every scene holds exactly one object (a circle, a square or a triangle) of random colour, scale, slight tilt and
position on a noisy, muted colour-gradient background with a few thin strokes as distractors. The object's tight
bounding box is known, so a heatmap can be checked against where the object really is. Pure numpy and Pillow:
engine-side code imports this without TensorFlow.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")

BOXES_CSV = "boxes.csv"
JPEG_QUALITY = 90

_MIN_SCALE = 0.20  # object side (circle diameter, square side, triangle circumdiameter) as a fraction of the image
_MAX_SCALE = 0.40
_MAX_TILT = np.deg2rad(15.0)  # squares and triangles lean a little either way, never enough to swap their outlines
_MIN_CONTRAST = 100.0  # least RGB distance between the object colour and the background it covers
_COLOUR_TRIES = 50
_BACKGROUND_GREY = (40.0, 215.0)  # mean grey level of the background
_BACKGROUND_TINT = 25.0  # spread of its colour cast around that grey
_GRADIENT_SPREAD = 35.0  # colour change from one side of the gradient to the other
_BLOTCH_SIGMA = (3.0, 12.0)  # low-frequency background texture, grey levels
_NOISE_SIGMA = (2.0, 8.0)  # per-pixel sensor-like noise, grey levels
_DISTRACTORS = (1, 5)  # thin strokes per scene, upper bound exclusive


@dataclass(frozen=True)
class Scene:
    """One synthetic image with its ground truth: class index and the object's tight bounding box."""

    image: np.ndarray  # uint8 [S, S, 3], RGB
    label: int  # index into CLASS_NAMES
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive-exclusive


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour linear gradient in a random direction with low-frequency blotches, float RGB [S, S, 3]."""
    # A muted tint that drifts across the image: varied scenes, yet the object is what stands out.
    c0 = rng.uniform(*_BACKGROUND_GREY) + rng.normal(0.0, _BACKGROUND_TINT, 3)
    c1 = c0 + rng.normal(0.0, _GRADIENT_SPREAD, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    img = c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    cells = int(rng.integers(3, 8))
    coarse = rng.normal(0.0, rng.uniform(*_BLOTCH_SIGMA), (cells, cells, 3))
    planes = [Image.fromarray(coarse[..., c].astype(np.float32)) for c in range(3)]
    blotches = np.stack([np.asarray(p.resize((size, size), Image.BILINEAR)) for p in planes], axis=-1)
    return img + blotches


def _draw_distractors(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Thin short strokes and polylines: clutter that is no class shape, so the model must look for the object."""
    size = img.shape[0]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(*_DISTRACTORS))):
        n_points = int(rng.integers(2, 4))
        start = rng.uniform(0, size - 1, 2)
        points = [tuple(start)]
        for _ in range(n_points - 1):
            step = rng.uniform(0.06, 0.18) * size
            angle = rng.uniform(0, 2 * np.pi)
            start = np.clip(start + step * np.array([np.cos(angle), np.sin(angle)]), 0, size - 1)
            points.append(tuple(start))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(points, fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(canvas).astype(np.float64)


def _shape_polygon(label: int, side: float, angle: float) -> np.ndarray | None:
    """Vertices of the shape centred at the origin, float [V, 2] (x, y); None for the circle, drawn as an ellipse."""
    name = CLASS_NAMES[label]
    if name == "circle":
        return None
    if name == "square":
        base = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * (side / 2.0)
    elif name == "triangle":
        r = side / 2.0
        ang = np.array([-np.pi / 2, -np.pi / 2 + 2 * np.pi / 3, -np.pi / 2 + 4 * np.pi / 3])
        base = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=-1)
    else:  # pragma: no cover - CLASS_NAMES and this table change together
        raise ValueError(f"no drawing rule for class {name!r}")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return base @ rot.T


def _object_mask(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Binary mask [S, S] of one shape of the class at a random scale, tilt and position fully inside the image."""
    side = rng.uniform(_MIN_SCALE, _MAX_SCALE) * size
    poly = _shape_polygon(label, side, rng.uniform(-_MAX_TILT, _MAX_TILT))
    if poly is None:
        lo = np.array([-side / 2.0, -side / 2.0])
        hi = -lo
    else:
        lo, hi = poly.min(axis=0), poly.max(axis=0)
    # Keep the whole extent, plus a pixel of slack for rasterisation, inside [0, size - 1].
    cx = rng.uniform(-lo[0] + 1.0, size - 2.0 - hi[0])
    cy = rng.uniform(-lo[1] + 1.0, size - 2.0 - hi[1])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if poly is None:
        draw.ellipse([cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1]], fill=255)
    else:
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in poly], fill=255)
    return np.asarray(mask) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive-exclusive pixel box (x0, y0, x1, y1) around the mask's set pixels."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _object_colour(rng: np.random.Generator, covered: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the object, so every label is visible."""
    mean = covered.reshape(-1, 3).mean(axis=0)
    best, best_dist = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, 3)
        dist = float(np.linalg.norm(colour - mean))
        if dist >= _MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def make_scene(rng: np.random.Generator, size: int = 96, *, plain: bool = False) -> Scene:
    """One scene with one object of a random class, so a heatmap can be scored against a known box.

    ``plain`` draws the object on a flat noiseless background with no distractors: every pixel that differs from the
    background then belongs to the object, which lets tests check the box exactly.
    """
    label = int(rng.integers(len(CLASS_NAMES)))
    if plain:
        img = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).astype(np.float64)
    else:
        img = _draw_distractors(rng, _background(rng, size))
    mask = _object_mask(rng, label, size)
    colour = _object_colour(rng, img[mask])
    img = np.where(mask[..., None], colour, img)
    if not plain:
        img = img + rng.normal(0.0, rng.uniform(*_NOISE_SIGMA), img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image=image, label=label, box=_tight_box(mask))


def make_scenes(n: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A reproducible batch of scenes as arrays, for training and for scoring heatmaps: images, labels, boxes."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        scene = make_scene(rng, size)
        images[i] = scene.image
        labels[i] = scene.label
        boxes[i] = scene.box
    return images, labels, boxes


def write_scene_files(
    out_dir: Path, n: int, seed: int, size: int = 96
) -> list[tuple[Path, int, tuple[int, int, int, int]]]:
    """Write scenes as JPEG files plus boxes.csv, so the engine can be run on a real image folder with known answers.

    Files are named ``scene_00000_circle.jpg``; ``boxes.csv`` has the header ``path,label,x0,y0,x1,y1`` with paths
    relative to ``out_dir``. Returns (absolute path, label, box) per file, in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels, boxes = make_scenes(n, seed, size)
    written: list[tuple[Path, int, tuple[int, int, int, int]]] = []
    with open(out_dir / BOXES_CSV, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
        for i in range(n):
            label = int(labels[i])
            box = tuple(int(v) for v in boxes[i])
            path = out_dir / f"scene_{i:05d}_{CLASS_NAMES[label]}.jpg"
            Image.fromarray(images[i]).save(path, format="JPEG", quality=JPEG_QUALITY)
            writer.writerow([path.name, label, *box])
            written.append((path.resolve(), label, box))
    return written


def read_scene_files(out_dir: Path) -> list[tuple[Path, int, tuple[int, int, int, int]]]:
    """Read back boxes.csv as written by write_scene_files, so a run over the folder can be scored."""
    out_dir = Path(out_dir)
    rows: list[tuple[Path, int, tuple[int, int, int, int]]] = []
    with open(out_dir / BOXES_CSV, newline="") as fh:
        for row in csv.DictReader(fh):
            box = (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"]))
            rows.append(((out_dir / row["path"]).resolve(), int(row["label"]), box))
    return rows


def pointing_hits(cams: np.ndarray, boxes: np.ndarray, image_sizes: np.ndarray | tuple[int, int]) -> np.ndarray:
    """Per image, whether the heatmap's peak lands inside the object's box: the pointing game's raw outcome.

    ``cams`` is float [N, h, w] at the map's own resolution; the peak cell (first argmax) is mapped to the pixel
    centre of that cell in an image of ``image_sizes`` (width, height), given once as a pair or per image as [N, 2].
    A map with no positive finite value points nowhere and counts as a miss.
    """
    cams = np.asarray(cams, dtype=np.float64)
    if cams.ndim != 3:
        raise ValueError(f"cams must be [N, h, w], got shape {cams.shape}")
    n, h, w = cams.shape
    boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    sizes = np.broadcast_to(np.asarray(image_sizes, dtype=np.float64), (n, 2))
    flat = np.where(np.isfinite(cams), cams, -np.inf).reshape(n, h * w)
    peak = flat.argmax(axis=1)
    has_peak = flat[np.arange(n), peak] > 0
    row, col = np.divmod(peak, w)
    x = (col + 0.5) * sizes[:, 0] / w
    y = (row + 0.5) * sizes[:, 1] / h
    inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])
    return inside & has_peak


def pointing_game(cams: np.ndarray, boxes: np.ndarray, image_size: np.ndarray | tuple[int, int]) -> float:
    """Fraction of images whose heatmap peak falls inside the object's box: one number for "does it look right"."""
    hits = pointing_hits(cams, boxes, image_size)
    return float(hits.mean()) if hits.size else float("nan")
