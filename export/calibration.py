"""The user's images for int8 calibration and for the precision gate, read and decoded exactly as `gradcam run` reads
and decodes them (engine.inputs, engine.pipeline.load: same listing rules, same resize to the model's input size).

A deterministic sample of at most N images is drawn from everything the specs list; every fourth sampled image is
held out: the gate judges on those and calibration never sees them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from gradcam_engine.engine.errors import InputError
from gradcam_engine.export.errors import ExportError

DEFAULT_IMAGES = 200
MIN_IMAGES = 16
HELD_OUT_EVERY = 4
RANDOM_GATE_IMAGES = 32   # without --calibrate the gate judges on this many seeded random images
SAMPLE_SEED = 0


@dataclass
class GateImages:
    """Images the gate judges on, images int8 calibrates on (empty without --calibrate), and where they came from."""

    held_out: np.ndarray
    calibration: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)


def as_specs(specs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One input spec or several, as strings (a lone path must not be iterated character by character)."""
    return [os.fspath(specs)] if isinstance(specs, (str, os.PathLike)) else [os.fspath(s) for s in specs]


def list_calibration(specs: Sequence[str], wanted: int) -> list[Any]:
    """The items a calibration draws from: a deterministic sample of at most `wanted` of what the specs list."""
    from gradcam_engine.engine.inputs import list_inputs

    specs = as_specs(specs)
    try:
        items = list_inputs(specs).items
    except InputError as e:
        raise ExportError(f"--calibrate: {e}") from None
    if len(items) < MIN_IMAGES:
        raise ExportError(f"--calibrate: {len(items)} images found in {', '.join(specs)}; calibration and the "
                          f"precision gate need at least {MIN_IMAGES} (default sample {DEFAULT_IMAGES})")
    if len(items) > wanted:
        picked = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(items), wanted, replace=False))
        items = [items[i] for i in picked]
    return items


def load_gate_images(specs: Sequence[str] | None, wanted: int, size: tuple[int, int]) -> GateImages:
    """Decoded calibration and held-out images from the specs, or seeded random images when there are none."""
    if not specs:
        rng = np.random.default_rng(SAMPLE_SEED)
        images = rng.integers(0, 256, size=(RANDOM_GATE_IMAGES, *size, 3), dtype=np.uint8)
        return GateImages(images, images[:0], {"kind": "random", "images": RANDOM_GATE_IMAGES, "seed": SAMPLE_SEED,
                                               "note": "uniform noise: pass --calibrate to judge on your images"})
    from gradcam_engine.engine.pipeline import load
    from gradcam_engine.engine.run_config import RunConfig

    specs = as_specs(specs)
    items = list_calibration(specs, wanted)
    loaded = [load(item, size, RunConfig.max_bytes, RunConfig.max_pixels, False) for item in items]  # run's limits
    good = [x.image.pixels for x in loaded if x.image is not None]
    errors = [x.error for x in loaded if x.error]
    if len(good) < MIN_IMAGES:
        raise ExportError(f"--calibrate: only {len(good)} of {len(items)} sampled images decode (first error: "
                          f"{errors[0] if errors else '-'}); at least {MIN_IMAGES} are needed")
    pixels = np.stack(good)
    held = np.arange(len(pixels)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return GateImages(pixels[held], pixels[~held], {
        "kind": "held-out calibration images", "specs": [str(s) for s in specs], "sampled": len(items),
        "decoded": len(good), "undecodable": len(errors), "calibration": int((~held).sum()),
        "images": int(held.sum()), "held_out": f"every {HELD_OUT_EVERY}th sampled image, never calibrated on"})
