"""Overlays as in the seed: the CAM upsampled bilinearly to the image, jet-coloured, blended 0.6 heat / 0.4 image.

Pure numpy and vectorised: upsampling is two small matrix products per image size (batched over every image of
that size), colouring is one table lookup, blending one expression; no loop touches a pixel.
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.pipeline import LoadedBatch
from gradcam_engine.engine.results import path_text

OVERLAY_DIR = "overlays"
_UNSAFE = re.compile(r"[^\w.+-]+")

HEAT_WEIGHT, IMAGE_WEIGHT = 0.6, 0.4

# matplotlib's "jet" segment data: (x, value) breakpoints per channel, so no plotting library is needed.
_JET = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


@lru_cache(maxsize=1)
def jet_table() -> np.ndarray:
    """The 256-entry jet lookup table, float32 [256, 3] in [0, 1], as matplotlib builds it."""
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(x, *zip(*_JET[c])) for c in "rgb"], axis=-1).astype(np.float32)


def jet(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1], any shape -> RGB float32 [..., 3]; indexes the table as matplotlib's Colormap does."""
    index = np.clip((np.nan_to_num(heat) * 256).astype(np.int32), 0, 255)
    return jet_table()[index]


def bilinear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: the two input positions it blends (lo, hi) and the weight of hi, for bilinear resizing
    with half-pixel centres (tf.image.resize's default); the one definition the matrices and the metrics share."""
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    centres = np.clip(centres, 0, in_size - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (centres - lo).astype(np.float32)
    return lo, hi, frac


@lru_cache(maxsize=256)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of bilinear resizing with half-pixel centres (tf.image.resize's default)."""
    lo, hi, frac = bilinear_taps(out_size, in_size)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def upsample(cams: np.ndarray, height: int, width: int) -> np.ndarray:
    """cams [N, h, w] -> [N, height, width], bilinear, half-pixel centres."""
    ry = bilinear_matrix(height, cams.shape[1])  # (height, h)
    rx = bilinear_matrix(width, cams.shape[2])   # (width, w)
    return np.einsum("oh,nhw,pw->nop", ry, cams.astype(np.float32), rx, optimize=True)


def blend(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, 3] and heat [N, H, W] in [0, 1] -> uint8 overlays, 0.6 jet + 0.4 image, clipped."""
    mixed = HEAT_WEIGHT * jet(heat) + IMAGE_WEIGHT * (images.astype(np.float32) / 255.0)
    return (np.clip(mixed, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlays(images: list[np.ndarray], cams: np.ndarray) -> list[np.ndarray]:
    """Overlay each CAM on its own full-size image; images of equal size are processed as one batch."""
    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape[:2], []).append(i)
    for (h, w), idx in by_size.items():
        heat = upsample(cams[idx], h, w)
        for i, overlay in zip(idx, blend(np.stack([images[i] for i in idx]), heat)):
            out[i] = overlay
    return out  # type: ignore[return-value]


def overlay_name(path: str) -> str:
    """The overlay file of a results row, from its `path` alone: the image's name (made file-name safe) and the
    first 12 hex digits of sha256(path), so names never depend on listing positions and never collide."""
    stem = _UNSAFE.sub("_", os.path.splitext(path.split("::")[-1].rsplit("/", 1)[-1])[0])[:80]
    return f"{stem}_{hashlib.sha256(path.encode()).hexdigest()[:12]}.jpg"


def write_overlays(folder: Path, batch: LoadedBatch, outputs: dict[str, np.ndarray] | None,
                   method_index: int = 0) -> None:
    """One JPEG per input of the batch that kept its full-size image, named by overlay_name; each appears
    atomically. method_index picks the map shown: 0 is `cam`, the first method; another is that method's slice of
    `cams`."""
    from PIL import Image

    chosen = [(i, x) for i, x in enumerate(batch.good) if x.image.original is not None]
    if not chosen or outputs is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    cams = (outputs[C.CAM] if method_index == 0 else outputs[C.CAMS][:, method_index])[[i for i, _ in chosen]]
    for (_, x), overlay in zip(chosen, overlays([x.image.original for _, x in chosen], cams)):
        target = folder / overlay_name(path_text(x.key))
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            Image.fromarray(overlay).save(tmp, format="JPEG", quality=90)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
