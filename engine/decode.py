"""Image bytes to the RGB uint8 pixels the exported graph takes, at the model's input size.

Every failure is a DecodeError with a one-line cause, so a bad file becomes an error row and the run goes on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from gradcam_engine.engine.errors import one_line

DECODE_FILTER = "bilinear"
DEFAULT_MAX_PIXELS = 89_478_485

# Only these decoders run: the others include EPS, which starts Ghostscript on untrusted bytes. The JPEG decoder also
# reads multi-picture (MPO) files, as phones write them.
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
Image.init()
SUPPORTED_FORMATS: tuple[str, ...] = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)

# decode_image checks the header size against its own max_pixels before any pixel is loaded. PIL's process-wide check
# would refuse first, without naming the size, and would cap max_pixels at twice its default.
Image.MAX_IMAGE_PIXELS = None

_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that transpose the image
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class DecodeError(Exception):
    """The bytes are not a usable image; the message names the cause in one line."""


@dataclass(frozen=True)
class DecodedImage:
    """Pixels at the model's input size, and the original size the results report."""

    pixels: np.ndarray  # uint8 [H, W, 3] at the target size, C-contiguous
    width: int  # original size after EXIF orientation, at full resolution
    height: int
    original: np.ndarray | None = None  # uint8 [height, width, 3] full resolution, only when asked (overlays)


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 keep_original: bool = False) -> DecodedImage:
    """Decode to RGB at size (height, width) with a bilinear resize, so every image fits the graph's input.

    EXIF orientation is applied. Alpha is dropped, keeping the stored colour under transparent pixels (as
    Keras' load_img does), not composited. 16-bit images are scaled to 8 bits, float images clipped to 0..255.
    Animated images give their first frame. `keep_original` also returns the full-resolution RGB image (for
    overlays); the model's pixels are the same either way.
    """
    target_height, target_width = size
    rgb, width, height = _open_rgb(data, max_pixels, draft=(target_width, target_height))
    resized = rgb.resize((target_width, target_height), Image.Resampling.BILINEAR)
    pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))
    original = None
    if keep_original:
        full = rgb if rgb.size == (width, height) else _open_rgb(data, max_pixels, draft=None)[0]
        original = np.asarray(full, dtype=np.uint8)
    return DecodedImage(pixels=pixels, width=width, height=height, original=original)


def _open_rgb(data: bytes, max_pixels: int, draft: tuple[int, int] | None) -> tuple[Image.Image, int, int]:
    """RGB image (reduced by JPEG draft mode when `draft` is a (width, height) target) and the full oriented size."""
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"{one_line(exc)} (decompression bomb guard)") from None
    except Exception as exc:  # PIL's parsers raise many types on malformed headers
        raise DecodeError(f"truncated or corrupt image data ({one_line(exc)})") from None

    with image:
        stored_width, stored_height = image.size
        if stored_width * stored_height > max_pixels:
            raise DecodeError(
                f"image is {stored_width}x{stored_height} pixels, over the limit of {max_pixels} "
                "(decompression bomb guard)"
            )
        try:
            if draft and isinstance(image, JpegImagePlugin.JpegImageFile):  # also multi-picture (MPO) files
                # Decodes at 1/2, 1/4 or 1/8 scale when that still covers the target; never below it.
                swapped = _orientation(image) in _SWAPS_AXES
                image.draft("RGB", (draft[1], draft[0]) if swapped else draft)
            image.load()
            # Read after load: a PNG may keep its EXIF after the pixel data.
            orientation = _orientation(image)
            if orientation in _SWAPS_AXES:
                width, height = stored_height, stored_width
            else:
                width, height = stored_width, stored_height
            if orientation != 1:
                ImageOps.exif_transpose(image, in_place=True)
            rgb = _to_rgb(image)
        except DecodeError:
            raise
        except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError and others on bad data
            raise DecodeError(f"truncated or corrupt image data ({one_line(exc)})") from None
    return rgb, width, height


def _orientation(image: Image.Image) -> int:
    # Damaged EXIF is common in otherwise good files; it means "no orientation", not a failed image.
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips at 255, which turns most of a 16-bit image white.
        values = np.asarray(image).astype(np.int64)
        scaled = (np.clip(values, 0, 65535) + 128) // 257
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        scaled = np.rint(np.clip(values, 0, 255))
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Through RGBA, so PIL applies the transparency table instead of warning about it; the alpha is then dropped.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise DecodeError(f"unsupported colour mode {image.mode}") from None
