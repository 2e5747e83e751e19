"""How faithful a CAM is to the model, asked of the model itself: perturb the image where the CAM points and watch
the target class's score (the model's `predictions` output for the class the run explained).

- Average Drop / Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++): Y is the score on the image, O the
  score on the image multiplied pixel by pixel by its CAM (upsampled to the model's input); per image
  drop = max(0, Y - O) / Y and increase = O > Y.
- Deletion / insertion (Petsiuk et al. 2018, RISE): pixels ordered by CAM value (most salient first) at the model's
  input resolution; deletion replaces the first k/K of them by a baseline image, insertion starts from the baseline
  and puts them back, for k = 0..K; the area under each score curve (x from 0 to 1) is the metric. A faithful map
  makes deletion fall fast (low AUC) and insertion rise fast (high AUC).

Everything happens on the uint8 pixels the graph takes (its preprocessing stays inside it), in batches through the
same session as a run, asking for the predictions output alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from gradcam_engine.engine import contract as C
from gradcam_engine.engine.metrics import confidence_drop, curve_auc
from gradcam_engine.engine.overlay import upsample

KINDS = ("drop", "deletion", "insertion")
DEFAULT_STEPS = 8
BLUR_SIGMA, BLUR_TAPS = 5.0, 11  # the RISE code's blur: an 11-tap Gaussian kernel, sigma 5 pixels

Baseline = Callable[[np.ndarray], np.ndarray]
BASELINES: dict[str, Baseline] = {}


def baseline(name: str) -> Callable[[Baseline], Baseline]:
    """Register what deleted pixels become (the name `--baseline` takes): uint8 [N, H, W, 3] -> the same shape."""
    def register(fn: Baseline) -> Baseline:
        BASELINES[name] = fn
        return fn
    return register


@lru_cache(maxsize=1)
def _gaussian_kernel() -> np.ndarray:
    x = np.arange(BLUR_TAPS) - BLUR_TAPS // 2
    k = np.exp(-(x ** 2) / (2 * BLUR_SIGMA ** 2))
    return (k / k.sum()).astype(np.float32)


@baseline("blur")
def blurred(images: np.ndarray) -> np.ndarray:
    """The image under a Gaussian blur (sigma 5 px, 11 taps, edges repeated): the object's colours stay, its shape
    goes, so the curves measure the shape the CAM found rather than a colour change."""
    kernel = _gaussian_kernel()
    pad = BLUR_TAPS // 2
    out = images.astype(np.float32)
    for axis in (1, 2):
        widths = [(0, 0)] * 4
        widths[axis] = (pad, pad)
        padded = np.pad(out, widths, mode="edge")
        n = out.shape[axis]
        out = sum(weight * np.take(padded, np.arange(i, i + n), axis=axis) for i, weight in enumerate(kernel))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@baseline("mean")
def mean_colour(images: np.ndarray) -> np.ndarray:
    """Every pixel the image's own mean colour: no shape and no texture left at all."""
    mean = images.reshape(len(images), -1, 3).mean(axis=1)
    return np.broadcast_to(np.rint(mean)[:, None, None, :], images.shape).astype(np.uint8)


@lru_cache(maxsize=16)
def _tie_break(pixels: int) -> np.ndarray:
    """A fixed shuffle of pixel positions: equal CAM values (the zeros after ReLU) are removed in a scattered order,
    not row by row from the top, which would delete one side of the image first."""
    return np.random.default_rng(0).permutation(pixels)


def removal_rank(heat: np.ndarray) -> np.ndarray:
    """int32 [N, H * W]: each pixel's place in the removal order, 0 = highest CAM value (ties: a fixed shuffle)."""
    n = heat.shape[0]
    flat = heat.reshape(n, -1)
    tie = np.broadcast_to(_tie_break(flat.shape[1]), flat.shape)
    order = np.lexsort((tie, -flat), axis=-1)
    rank = np.empty(flat.shape, np.int32)
    np.put_along_axis(rank, order, np.arange(flat.shape[1], dtype=np.int32)[None, :].repeat(n, 0), axis=1)
    return rank


def removed_counts(pixels: int, steps: int) -> np.ndarray:
    """How many pixels are removed (deletion) or put back (insertion) at k = 0..steps."""
    return np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)


def masked_by_cam(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image multiplied by its CAM (heat [N, H, W] in [0, 1] at the image's size), as the graph's uint8 input."""
    return np.clip(np.rint(images.astype(np.float32) * heat[..., None]), 0, 255).astype(np.uint8)


@dataclass
class Faithfulness:
    """Per image of a batch, one method; NaN/None where the kind was not asked for."""

    score: np.ndarray            # float [N]: target score on the image
    masked_score: np.ndarray     # float [N]: on the image times its CAM
    drop: np.ndarray             # float [N]: max(0, Y - O) / Y
    increase: np.ndarray         # bool [N]: O > Y
    deletion: np.ndarray         # float [N, K + 1]: score after removing k/K of the pixels
    insertion: np.ndarray        # float [N, K + 1]: score after putting k/K of them back into the baseline

    @property
    def deletion_auc(self) -> np.ndarray:
        return curve_auc(self.deletion)

    @property
    def insertion_auc(self) -> np.ndarray:
        return curve_auc(self.insertion)


Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def session_scorer(session: object, batch_size: int) -> Scorer:
    """images, target -> the target class's predictions value, through a GradCAMSession in batches."""
    def score(images: np.ndarray, target: np.ndarray) -> np.ndarray:
        out = np.empty(len(images), np.float64)
        for a in range(0, len(images), batch_size):
            predictions = session({C.IMAGES: images[a:a + batch_size],  # type: ignore[operator]
                                   C.CLASS_INDEX: target[a:a + batch_size].astype(np.int32)},
                                  (C.PREDICTIONS,))[C.PREDICTIONS]
            out[a:a + batch_size] = predictions[np.arange(len(predictions)), target[a:a + batch_size]]
        return out
    return score


def measure(score: Scorer, images: np.ndarray, target: np.ndarray, cams: dict[str, np.ndarray], kinds: tuple[str, ...],
            steps: int, baseline_name: str) -> dict[str, Faithfulness]:
    """Every asked kind for every method's CAM on one batch of images [N, H, W, 3] at the model's input size.

    Forward passes per image: 1 (the image) + 1 (the baseline, for deletion/insertion) + per method 1 (drop) and
    K - 1 each for deletion and insertion (their ends are the image and the baseline).
    """
    n, height, width, _ = images.shape
    target = np.asarray(target, np.int64)
    curves = "deletion" in kinds or "insertion" in kinds
    full = score(images, target)
    base_images = BASELINES[baseline_name](images) if curves else None
    base = score(base_images, target) if curves else np.full(n, np.nan)
    counts = removed_counts(height * width, steps)
    nan = np.full(n, np.nan)
    out: dict[str, Faithfulness] = {}
    for method, cam in cams.items():
        heat = np.clip(upsample(cam, height, width), 0.0, 1.0)
        masked = score(masked_by_cam(images, heat), target) if "drop" in kinds else nan
        drop, increase = confidence_drop(full, masked) if "drop" in kinds else (nan, np.zeros(n, bool))
        deletion = np.full((n, steps + 1), np.nan)
        insertion = np.full((n, steps + 1), np.nan)
        if curves:
            rank = removal_rank(heat).reshape(n, height, width, 1)
            deletion[:, 0], deletion[:, steps] = full, base
            insertion[:, 0], insertion[:, steps] = base, full
            for k in range(1, steps):
                chosen = rank < counts[k]
                if "deletion" in kinds:
                    deletion[:, k] = score(np.where(chosen, base_images, images), target)
                if "insertion" in kinds:
                    insertion[:, k] = score(np.where(chosen, images, base_images), target)
            if "deletion" not in kinds:
                deletion[:] = np.nan
            if "insertion" not in kinds:
                insertion[:] = np.nan
        out[method] = Faithfulness(score=full, masked_score=masked, drop=drop, increase=increase,
                                   deletion=deletion, insertion=insertion)
    return out
