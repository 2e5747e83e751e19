"""Bad inputs lose nothing: each gets one error row naming its cause, odd but valid images get ok rows, and problems
that make a run meaningless stop it before anything is written."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_engine.cli.main import main
from gradcam_engine.engine.local_run import run_gradcam
from gradcam_engine.engine.run_config import RunConfig
from engine_support import (SmallArtifact, artifact, copy_artifact, encode, measured_run,  # noqa: F401 (fixture)
                            rows_by_path, scene, write_image)

BOMB_SIDE = 20_000


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid side x side 1-bit greyscale PNG of zeros: tens of kB on disk, hundreds of MB once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(row * 500) for _ in range(side // 500)]
    chunks.append(compressor.compress(row * (side % 500)))
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(chunks))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 200_000
    return path


def bad_inputs(folder: Path, bomb: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, text its error message must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(scene(120, 90, 1), "JPEG", quality=90)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.jpg").write_text("these are notes, not an image\n")
    (folder / "document.png").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n")
    (folder / "icon.png").write_bytes(encode(Image.fromarray(scene(32, 32, 2)), "ICO"))
    (folder / "a_directory.jpg").mkdir()
    os.symlink(folder / "gone.jpg", folder / "broken_link.jpg")
    return {
        "empty": (folder / "empty.jpg", "empty file (0 bytes)"),
        "truncated": (folder / "truncated.jpg", "truncated or corrupt image data"),
        "text": (folder / "notes.jpg", "not a recognised image format"),
        "pdf": (folder / "document.png", "not a recognised image format"),
        "ico": (folder / "icon.png", "not a recognised image format"),
        "bomb": (bomb, f"{BOMB_SIDE}x{BOMB_SIDE} pixels"),
        "directory": (folder / "a_directory.jpg", "is a directory"),
        "broken_symlink": (folder / "broken_link.jpg", "broken symlink"),
    }


def odd_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """name -> (path, (width, height) the results must report)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = scene(40, 24, 3)
    grey = (np.linspace(0, 255, 30 * 20).reshape(20, 30)).astype(np.uint8)
    deep = (np.linspace(0, 65535, 25 * 15).reshape(15, 25)).astype(np.uint16)
    rgba = np.dstack([scene(21, 13, 4), np.linspace(0, 255, 21 * 13).reshape(13, 21).astype(np.uint8)])
    files = {
        "one_pixel": (write_image(folder / "one_pixel.png", np.full((1, 1, 3), 200, np.uint8)), (1, 1)),
        "greyscale": (write_image(folder / "greyscale.jpg", grey), (30, 20)),
        "sixteen_bit": (folder / "sixteen_bit.png", (25, 15)),
        "palette_gif": (folder / "palette.gif", (40, 24)),
        "rgba": (folder / "rgba.png", (21, 13)),
        "cmyk_jpeg": (folder / "cmyk.jpg", (40, 24)),
        "exif_rotated": (folder / "rotated.jpg", (24, 40)),  # stored 40x24, orientation 6: shown 24 wide, 40 high
    }
    Image.fromarray(deep).save(folder / "sixteen_bit.png")
    assert Image.open(folder / "sixteen_bit.png").mode.startswith("I")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.gif")
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(folder / "rotated.jpg", quality=90, exif=exif)
    return files


def write_path_list(path: Path, entries: list[Path]) -> Path:
    path.write_text("".join(f"{p}\n" for p in entries))
    return path


def test_each_bad_input_gets_one_error_row_naming_its_cause_and_good_images_still_get_results(
        artifact: SmallArtifact, bomb: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = bad_inputs(tmp_path / "bad", bomb)
    good = [write_image(tmp_path / "good" / f"good_{i}.{ext}", scene(50 + 7 * i, 40 + 5 * i, 10 + i))
            for i, ext in enumerate(["jpg", "png", "jpg", "png", "jpg"])]
    # Good and bad interleaved, so a failure cannot shift the results of the images batched with it.
    entries: list[Path] = []
    for i, (path, _) in enumerate(bad.values()):
        entries.append(path)
        if i < len(good):
            entries.append(good[i])
    listing = write_path_list(tmp_path / "inputs.txt", entries)

    summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(listing)], out=str(tmp_path / "run"),
                                    batch_size=2, shard_size=3, progress=False))

    assert (summary.images, summary.ok, summary.errors) == (len(bad) + len(good), len(good), len(bad))
    rows = rows_by_path(tmp_path / "run")
    assert len(rows) == len(entries)
    for name, (path, cause) in bad.items():
        row = rows[str(path)]
        assert row["status"] == "error", name
        assert cause in row["error"], (name, row["error"])
        assert str(path) in row["error"], name
        assert "\n" not in row["error"], name
        assert row["cam"] is None and row["predicted_class"] is None, name
    for path in good:
        row = rows[str(path)]
        assert row["status"] == "ok" and row["error"] is None
        assert len(row["cam"]) == row["cam_height"] * row["cam_width"] > 0


def test_odd_but_valid_images_get_ok_rows_with_their_displayed_size(artifact: SmallArtifact,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    odd = odd_images(tmp_path / "odd")
    summary = run_gradcam(RunConfig(artifact=str(artifact.root), inputs=[str(tmp_path / "odd")],
                                    out=str(tmp_path / "run"), batch_size=3, progress=False))
    assert (summary.ok, summary.errors) == (len(odd), 0)
    rows = rows_by_path(tmp_path / "run")
    for name, (path, (width, height)) in odd.items():
        row = rows[str(path)]
        assert row["status"] == "ok", (name, row["error"])
        assert (row["width"], row["height"]) == (width, height), name
        assert np.isfinite(row["cam"]).all(), name


def test_a_decompression_bomb_is_refused_without_decoding_it(artifact: SmallArtifact, bomb: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png", scene(64, 64, 5))
    without = measured_run(artifact.root, tmp_path / "without", [str(good)])
    with_bomb = measured_run(artifact.root, tmp_path / "with", [str(bomb), str(good)])
    assert (with_bomb["ok"], with_bomb["errors"]) == (1, 1)
    row = rows_by_path(tmp_path / "with")[str(bomb)]
    assert row["status"] == "error"
    assert f"{BOMB_SIDE}x{BOMB_SIDE} pixels" in row["error"] and "limit" in row["error"]
    # Decoding it would need at least 400 MB (one byte per pixel); refusing it from the header needs nothing.
    grown_mb = (with_bomb["vmhwm_kb"] - without["vmhwm_kb"]) / 1024
    assert grown_mb < 50, f"peak memory grew by {grown_mb:.0f} MB"


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return lines[0]


def test_a_missing_input_path_stops_the_run_before_it_starts(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = write_image(tmp_path / "good.jpg", scene(64, 64, 6))
    missing = tmp_path / "no_such_folder"
    line = cli_error(["run", str(artifact.root), str(good), str(missing), "--out", str(tmp_path / "run")], capsys)
    assert line.startswith("gradcam run: error:")
    assert str(missing) in line and "no such file or directory" in line
    assert not (tmp_path / "run").exists()


def test_a_tampered_artifact_stops_the_run_before_it_starts(artifact: SmallArtifact, tmp_path: Path,  # noqa: F811
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    tampered = copy_artifact(artifact, tmp_path / "tampered")
    onnx = tampered.root / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    good = write_image(tmp_path / "good.jpg", scene(64, 64, 7))
    line = cli_error(["run", str(tampered.root), str(good), "--out", str(tmp_path / "run")], capsys)
    assert "model.onnx" in line and "checksum mismatch" in line
    assert not (tmp_path / "run").exists()
