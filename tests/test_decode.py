"""Decoding image bytes into the RGB pixels the graph takes."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin

from gradcam_engine.engine.decode import DecodedImage, DecodeError, decode_image


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def smooth_rgb(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    channels = [200 * x + 30 * y, 120 + 100 * np.sin(3 * x + 2 * y), 250 * y * (1 - x / 2)]
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of bilinear resampling between pixel centres: a triangle filter, widened by the scale
    when shrinking so every source pixel counts (as PIL and tf.image.resize(antialias=True) define it)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    weights = np.clip(1 - np.abs((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / support, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Separable bilinear resize of [H, W, 3] pixels, in float64."""
    x = np.einsum("oj,ijc->ioc", triangle_weights(pixels.shape[1], width), pixels.astype(np.float64))
    return np.einsum("oi,ijc->ojc", triangle_weights(pixels.shape[0], height), x)


@pytest.mark.parametrize(("stored", "target"), [((7, 5), (64, 96)), ((301, 203), (64, 96)), ((50, 200), (64, 96)),
                                                ((120, 90), (37, 53))],
                         ids=["enlarged", "shrunk", "shrunk_and_enlarged", "shrunk_odd"])
def test_the_resize_is_bilinear(stored: tuple[int, int], target: tuple[int, int]) -> None:
    # Noise, so every filter gives its own pixels: nearest, box, bicubic, hamming and lanczos all differ from
    # bilinear here by 16 levels or more somewhere, while bilinear differs by rounding only.
    noise = np.random.default_rng(sum(stored)).integers(0, 256, (*stored, 3), dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(noise), "PNG"), target).pixels
    assert decoded.shape == (*target, 3)
    difference = float(np.abs(decoded - bilinear(noise, *target)).max())
    assert difference <= 1.0, f"differs from a bilinear resize by up to {difference:.1f} levels"


def test_output_is_contiguous_uint8_rgb_at_height_by_width() -> None:
    decoded = decode_image(encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG"), (3, 5))
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.shape == (3, 5, 3)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags.c_contiguous
    assert (decoded.pixels == (10, 200, 30)).all()
    assert (decoded.width, decoded.height) == (40, 30)


def test_zero_bytes_is_an_empty_file() -> None:
    with pytest.raises(DecodeError, match=r"^empty file \(0 bytes\)$"):
        decode_image(b"", (8, 8))


@pytest.mark.parametrize(
    "data",
    [
        b"just some text, saved with a .jpg name\n",
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n",
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    ],
    ids=["text", "pdf", "random"],
)
def test_non_images_are_not_a_recognised_image_format(data: bytes) -> None:
    with pytest.raises(DecodeError, match="^not a recognised image format$"):
        decode_image(data, (8, 8))


def test_postscript_is_not_handed_to_an_interpreter() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
    with pytest.raises(DecodeError, match="^not a recognised image format$"):
        decode_image(eps, (8, 8))


def test_truncated_jpeg_is_reported_as_truncated() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    with pytest.raises(DecodeError, match=r"^truncated or corrupt image data \(.+\)$"):
        decode_image(data[: len(data) // 2], (32, 32))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_reported_as_truncated() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(DecodeError, match=r"^truncated or corrupt image data \(.+\)$"):
        decode_image(data[: len(data) // 2], (32, 32))


def bomb_png(side: int) -> bytes:
    """A valid side x side 1-bit PNG of zeros: tens of kB of bytes, side * side bytes once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = zlib.compress(row * side, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# Decodes in a fresh interpreter and reports how much its peak resident memory (VmHWM) grew during the call; Pillow
# allocates pixels outside Python's allocator, so tracemalloc would not see them.
MEASURED_DECODE = r"""
import json, sys
from gradcam_engine.engine.decode import DecodeError, decode_image

def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    decode_image(data, (224, 224))
    message = None
except DecodeError as e:
    message = str(e)
print(json.dumps({"grown_kb": peak_kb() - before, "error": message}))
"""


def test_huge_image_is_refused_from_its_header_before_any_pixel_is_decoded(tmp_path: Path) -> None:
    # 20000x20000: 400 MB once decoded (one byte per pixel), more in RGB; its file is under 100 kB.
    data = bomb_png(20_000)
    assert len(data) < 100_000
    with pytest.raises(DecodeError) as raised:
        decode_image(data, (224, 224))
    assert str(raised.value) == (
        "image is 20000x20000 pixels, over the limit of 89478485 (decompression bomb guard)"
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", MEASURED_DECODE, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["error"] == str(raised.value)
    assert measured["grown_kb"] < 40 * 1024, f"peak memory grew by {measured['grown_kb'] / 1024:.0f} MB"


def test_pixel_limit_is_the_callers_and_applies_to_width_times_height() -> None:
    data = encode(Image.new("L", (100, 50), 7), "PNG")
    with pytest.raises(DecodeError, match=r"^image is 100x50 pixels, over the limit of 4999 "):
        decode_image(data, (4, 4), max_pixels=4999)
    assert (decode_image(data, (4, 4), max_pixels=5000).pixels == 7).all()


def test_limit_above_the_pil_default_is_honoured() -> None:
    # 200 million pixels is over twice PIL's own default limit; the caller's limit decides, not PIL's.
    header = struct.pack(">IIBBBBB", 20000, 10000, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
    with pytest.raises(DecodeError, match=r"^truncated or corrupt image data"):
        decode_image(data, (4, 4), max_pixels=300_000_000)


def test_one_pixel_image_fills_the_target() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (250, 5, 100)), "PNG"), (4, 6))
    assert decoded.pixels.shape == (4, 6, 3)
    assert (decoded.pixels == (250, 5, 100)).all()
    assert (decoded.width, decoded.height) == (1, 1)


def test_grayscale_is_replicated_to_three_equal_channels() -> None:
    gray = np.array([[0, 60], [130, 255]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(gray), "PNG"), (2, 2))
    assert (decoded.pixels == gray[:, :, None]).all()


def test_one_bit_image_is_black_and_white() -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "PNG"), (1, 2))
    assert decoded.pixels.tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[65535, 32896], [257, 0]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(encode(image, "PNG"), (2, 2))
    # Clipping would give 255 for every value over 255.
    assert decoded.pixels[:, :, 0].tolist() == [[255, 128], [1, 0]]
    assert (decoded.pixels == decoded.pixels[:, :, :1]).all()


def test_float_image_is_clipped_to_the_byte_range() -> None:
    values = np.array([[-5.0, 100.4], [254.6, 300.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"), (2, 2))
    assert decoded.pixels[:, :, 0].tolist() == [[0, 100], [255, 255]]


def test_palette_gif_gives_its_palette_colours() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "GIF"), (1, 2))
    assert decoded.pixels.tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_palette_png_with_transparency_keeps_the_palette_colour() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "PNG", transparency=1), (1, 2))
    assert decoded.pixels.tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (decode_image(data, (4, 4)).pixels == (255, 0, 0)).all()


def test_rgba_drops_alpha_and_keeps_the_stored_colour() -> None:
    pixels = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), (1, 2))
    assert decoded.pixels.tolist() == [[[10, 20, 30], [200, 100, 50]]]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    image.paste((0, 255, 255, 0), (8, 0, 16, 8))  # cyan-free, full magenta and yellow: red
    data = encode(image, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, (8, 16)).pixels.astype(int)
    assert np.abs(decoded[4, 2] - (255, 255, 255)).max() <= 3
    assert np.abs(decoded[4, 13] - (255, 0, 0)).max() <= 3


def test_exif_orientation_is_applied_and_size_is_reported_upright() -> None:
    # Stored 60 wide and 40 high with a red top-left corner; orientation 6 means "rotate 90 degrees clockwise".
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif), (60, 40))
    assert (decoded.width, decoded.height) == (40, 60)
    pixels = decoded.pixels.astype(int)
    assert pixels.shape == (60, 40, 3)
    assert np.abs(pixels[4, 35] - (255, 0, 0)).max() <= 10  # top-left went to top-right
    assert np.abs(pixels[4, 4] - (0, 0, 255)).max() <= 10
    assert np.abs(pixels[55, 35] - (0, 0, 255)).max() <= 10


def test_big_jpeg_decodes_at_reduced_scale_close_to_a_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(smooth_rgb(4000, 3000), "JPEG", quality=95)
    drafted_sizes = spy_on_draft(monkeypatch)
    decoded = decode_image(data, (224, 224))
    # 3000 // 224 = 13, so the decoder runs at 1/8 scale: 500x375, still over 224 on both sides.
    assert drafted_sizes == [(500, 375)]
    assert (decoded.width, decoded.height) == (4000, 3000)

    with Image.open(io.BytesIO(data)) as full:
        reference = np.asarray(full.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
    difference = np.abs(decoded.pixels.astype(int) - reference)
    assert difference.mean() < 1.0
    assert difference.max() <= 6


def test_draft_never_reduces_below_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(smooth_rgb(1000, 1000), "JPEG")
    drafted_sizes = spy_on_draft(monkeypatch)
    assert decode_image(data, (300, 300)).pixels.shape == (300, 300, 3)
    assert drafted_sizes == [(500, 500)]  # 1/2 scale: 1/4 would be 250, under the target


def test_draft_uses_the_upright_target_for_rotated_jpegs(monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = encode(smooth_rgb(4000, 1000), "JPEG", exif=exif)
    drafted_sizes = spy_on_draft(monkeypatch)
    decoded = decode_image(data, (400, 100))  # upright: 100 wide, 400 high; stored: 400 wide, 100 high
    assert drafted_sizes == [(500, 125)]
    assert decoded.pixels.shape == (400, 100, 3)
    assert (decoded.width, decoded.height) == (1000, 4000)


def test_multi_picture_jpeg_gives_its_first_picture_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = Image.new("RGB", (2000, 1000), (200, 10, 10)), Image.new("RGB", (2000, 1000), (0, 0, 200))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    drafted_sizes = spy_on_draft(monkeypatch)
    decoded = decode_image(data, (100, 200))
    assert drafted_sizes == [(250, 125)]
    assert np.abs(decoded.pixels.astype(int) - (200, 10, 10)).max() <= 4
    assert (decoded.width, decoded.height) == (2000, 1000)


def spy_on_draft(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):  # type: ignore[no-untyped-def]
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    return sizes
