"""The report's pictures as data: URIs: gallery thumbnails (the run's overlay when it wrote one, otherwise rendered
here with engine.overlay from the image read back as the run read it), ground-truth boxes drawn on them, and small
jet-coloured maps (mean CAMs, where peaks fall)."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from gradcam_engine.engine.inputs import InputItem
from gradcam_engine.engine.overlay import blend, jet, overlay_name, upsample
from gradcam_engine.engine.pipeline import load
from gradcam_engine.engine.run_config import RunConfig

THUMBNAIL = 200  # longest side, pixels


def data_uri(image: Image.Image, fmt: str = "JPEG", quality: int = 82) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {"optimize": True}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def heat_uri(values: np.ndarray, size: int = 96, normalise: bool = True) -> str:
    """A small map [h, w] as a jet PNG, upsampled bilinearly like an overlay (normalised to its own max)."""
    values = np.asarray(values, np.float32)
    if normalise and values.max() > 0:
        values = values / values.max()
    h, w = values.shape
    scale = size / max(h, w)
    heat = upsample(values[None], max(1, round(h * scale)), max(1, round(w * scale)))[0]
    return data_uri(Image.fromarray((jet(heat) * 255 + 0.5).astype(np.uint8)), "PNG")


class Thumbnails:
    """Finds or renders each gallery image's overlay, one per CAM method."""

    def __init__(self, overlays_dir: Path, first_method: str, item: Callable[[str], InputItem],
                 max_bytes: int = RunConfig.max_bytes, max_pixels: int = RunConfig.max_pixels):
        self.overlays_dir = overlays_dir
        self.first_method = first_method
        self.item = item  # results path -> the input, readable as the run read it (engine.run_view.RunView.item)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.rendered = self.reused = self.unreadable = 0

    def _run_overlay(self, path: str, width: int, height: int) -> Image.Image | None:
        """The run's overlay of this input (engine.overlay.overlay_name), when it wrote one at the input's size."""
        try:
            with Image.open(self.overlays_dir / overlay_name(path)) as im:
                if im.size != (width, height):
                    return None
                im.draft("RGB", _fit(width, height))
                return im.convert("RGB").resize(_fit(width, height), Image.Resampling.BILINEAR)
        except OSError:
            return None

    def overlays(self, path: str, width: int, height: int, cams: dict[str, np.ndarray],
                 boxes: np.ndarray | None) -> dict[str, str]:
        """method -> thumbnail data URI; empty when the image cannot be read back and the run has no overlay."""
        out: dict[str, Image.Image] = {}
        if self.first_method in cams:
            reused = self._run_overlay(path, width, height)
            if reused is not None:
                out[self.first_method] = reused
                self.reused += 1
        missing = [m for m in cams if m not in out]
        if missing:
            image = self._read(path, width, height)
            if image is None:
                self.unreadable += 1
            else:
                pixels = np.asarray(image)
                for m in missing:
                    heat = upsample(cams[m][None], pixels.shape[0], pixels.shape[1])
                    out[m] = Image.fromarray(blend(pixels[None], heat)[0])
                self.rendered += 1
        return {m: data_uri(_draw_boxes(im, boxes, width, height)) for m, im in out.items()}

    def _read(self, path: str, width: int, height: int) -> Image.Image | None:
        """The input decoded as the run decoded it (EXIF orientation included), straight to thumbnail size (a large
        JPEG is decoded at a reduced scale)."""
        thumb_width, thumb_height = _fit(width, height)
        loaded = load(self.item(path), (thumb_height, thumb_width), self.max_bytes, self.max_pixels, False)
        return None if loaded.image is None else Image.fromarray(loaded.image.pixels)


def _fit(width: int, height: int) -> tuple[int, int]:
    scale = THUMBNAIL / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draw_boxes(image: Image.Image, boxes: np.ndarray | None, width: int, height: int) -> Image.Image:
    """Ground-truth boxes as white-on-black outlines, so they show on any colour of the heatmap."""
    if boxes is None or not len(boxes):
        return image
    image = image.copy()
    draw = ImageDraw.Draw(image)
    sx, sy = image.width / max(width, 1), image.height / max(height, 1)
    for x0, y0, x1, y1 in boxes:
        rect = [x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1)]
        draw.rectangle(rect, outline=(0, 0, 0), width=3)
        draw.rectangle(rect, outline=(255, 255, 255), width=1)
    return image
