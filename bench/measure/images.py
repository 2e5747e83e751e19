"""The images every contender sees: structured synthetic scenes, as uint8 arrays and as JPEG files on disk.

Scenes (colour gradients with discs and boxes, mild noise) rather than noise, so JPEG files have realistic sizes and
decode costs and the CAMs have spatial structure. JPEG sets are written once per (count, size, seed) and reused.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

JPEG_QUALITY = 90
PHOTO_SIZE = (375, 500)  # (height, width) of a typical pet photo: what the pipeline decodes and resizes


def scene_images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """uint8 RGB [n, H, W, 3]: a tilted colour gradient with one to three discs or boxes and mild noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx + yy) / (h + w))[..., None]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        img = rng.uniform(30, 220, 3).astype(np.float32) + rng.uniform(-60, 60, 3).astype(np.float32) * ramp
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.12, 0.3) * min(h, w)
            if rng.random() < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:
                mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.5, 1.5))
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def jpeg_set(folder: Path, n: int, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0, distinct: int = 200
             ) -> list[Path]:
    """n JPEG files under folder (written once); beyond `distinct` scenes, files are shifted copies of earlier ones,
    so every file still decodes to different pixels without drawing thousands of scenes."""
    from PIL import Image

    folder = Path(folder) / f"jpeg-{size[0]}x{size[1]}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return paths
    base = scene_images(min(n, distinct), size, seed)
    for i in missing:
        pixels = base[i % len(base)]
        if i >= len(base):
            pixels = np.roll(pixels, shift=(7 * (i // len(base)), 11 * (i // len(base))), axis=(0, 1))
        tmp = paths[i].with_name(f".{paths[i].name}.tmp")
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, paths[i])
    return paths


def path_list(paths: list[Path], out: Path) -> Path:
    """A text file of paths: the input spec `gradcam run` takes for an exact image subset."""
    out = Path(out)
    out.write_text("".join(f"{p}\n" for p in paths))
    return out
