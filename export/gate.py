"""The precision gate: one judge for every reduced-precision file (fp16, int8, bf16), on what users see.

A reduced-precision file is compared with fp32 on the gate images (held-out calibration images when the user gave
some, else seeded random images) and kept only when its top-1 classes and CAMs stay close. The thresholds live
here, in one place; the figures come from export.parity.precision_figures. CAM max abs diff is recorded, never
judged: on a 3x3 map one cell moving by 0.07 says little about a heatmap that correlates at 0.999.

Why these limits (measured on the demo model, the seed ResNet50 and a MobileNetV2; README, precision section):
  - fp16 and bf16 are floating formats: on healthy models their CAMs correlate with fp32's at 0.9999 and more (demo
    fp16 0.99999, demo bf16 0.99997 mean / 0.9997 worst, ResNet50 bf16 0.9996 / 0.999). A mean below 0.999 or one
    map below 0.99 is a model the format handles badly: a BatchNorm-calibrated MobileNetV2 in full fp16 scores
    0.996 / 0.964 on scene images, where keeping its first 4 of 52 convolutions in fp32 gives 0.9993 / 0.995.
  - int8 rounds every activation to 256 levels: the demo model measures 0.9997 mean / 0.996 worst, a random-weight
    ResNet50 0.986 / 0.977 (0.985 / 0.917 calibrated on 16 images), so 0.98 mean / 0.90 worst passes those and stops
    calibrations that do not fit the data.
  - every CAM method of the artifact is held to the CAM limits (Eigen-CAM only on images whose principal direction
    is defined, export.parity.EIGEN_MIN_GAP): a format may suit Grad-CAM's map and not another method's.
  - top-1: 99% of the images keep their class; a change between two classes fp32 scores within 1% of each other
    (export.parity.NEAR_TIE) is a near-tie, counted and reported but not held against the file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FP16_SMALLEST_NORMAL = 6.1e-5
FP16_LARGEST = 65504.0


@dataclass(frozen=True)
class Limits:
    """The lowest acceptable value of each judged figure."""

    top1_agreement_beyond_ties: float
    cam_corr_mean: float
    cam_corr_worst: float


CAM_FIGURES = ("cam_corr_mean", "cam_corr_worst")  # judged for every CAM method of the artifact
THRESHOLDS: dict[str, Limits] = {
    "fp16": Limits(top1_agreement_beyond_ties=0.99, cam_corr_mean=0.999, cam_corr_worst=0.99),
    "bf16": Limits(top1_agreement_beyond_ties=0.99, cam_corr_mean=0.999, cam_corr_worst=0.99),
    "int8": Limits(top1_agreement_beyond_ties=0.99, cam_corr_mean=0.98, cam_corr_worst=0.90),
}


@dataclass
class Verdict:
    """One file judged: its figures, the limits it was held to, what failed, and whether it was written anyway."""

    precision: str
    figures: dict[str, Any]
    failed: list[str]
    kept: bool = False            # written although it failed (--keep-failing)
    notes: dict[str, Any] | None = None  # how the file was made (fp32 front kept, calibration)

    @property
    def passed(self) -> bool:
        return not self.failed

    def record(self) -> dict[str, Any]:
        """The manifest entry: every figure, the limits, and the outcome."""
        return {"precision": self.precision, "passed": self.passed, "failed": self.failed,
                **({"kept_although_failed": True} if self.kept else {}),
                "limits": asdict(THRESHOLDS[self.precision]), "figures": self.figures, **(self.notes or {})}


def judged(precision: str, figures: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Every judged figure -> (value, lowest acceptable): those the figures have (a forward-only graph has no CAM),
    and in an artifact with several CAM methods each further method's correlations, as `cam_corr_mean[method]` (the
    first method's map is `cam`, judged under the plain names)."""
    limits = asdict(THRESHOLDS[precision])
    out = {name: (float(figures[name]), low) for name, low in limits.items() if name in figures}
    for method, own in list(figures.get("methods", {}).items())[1:]:
        out.update({f"{name}[{method}]": (float(own[name]), limits[name]) for name in CAM_FIGURES if name in own})
    return out


def judge(precision: str, figures: dict[str, Any], notes: dict[str, Any] | None = None) -> Verdict:
    """Hold the figures to the precision's limits."""
    failed = [name for name, (value, low) in judged(precision, figures).items() if value < low]
    return Verdict(precision, figures, failed, notes=notes)


def summary(f: dict[str, float]) -> str:
    """The figures in one line, as printed after export and in a refusal."""
    ties = f" ({f['top1_changed_near_ties']} near-ties)" if f["top1_changed_near_ties"] else ""
    return (f"top-1 agreement {f['top1_agreement']:.1%}{ties}, CAM correlation mean {f['cam_corr_mean']:.4f} / "
            f"worst {f['cam_corr_worst']:.4f}, CAM max abs diff {f['cam_max_abs_diff']:.3f} on {f['images']} images")


def likely_cause(verdict: Verdict, calibration_images: int = 0) -> str:
    """The most probable reason a file failed, from its figures and how it was made."""
    f, precision = verdict.figures, verdict.precision
    peak = f.get("feature_maps_peak")
    if precision == "fp16" and peak is not None and 0 < peak < FP16_SMALLEST_NORMAL:
        return (f"feature maps peak at {peak:.1e}, below fp16's smallest normal {FP16_SMALLEST_NORMAL:.1e}: the "
                "model's activations underflow in half precision (BatchNorm statistics never updated from data?); "
                "calibrate the BatchNorm statistics or export fp32")
    if precision == "fp16" and peak is not None and peak > FP16_LARGEST:
        return (f"feature maps peak at {peak:.3g}, above fp16's largest value {FP16_LARGEST:g}: the activations "
                "overflow in half precision; use bf16 (--backend tf) or fp32")
    if f.get("cams_lost"):
        return (f"{f['cams_lost']} of {f['images']} CAMs are all zero in {precision} where fp32's are not: the "
                "activations are too small for the format")
    methods = sorted({name.split("[")[1].rstrip("]") for name in verdict.failed if "[" in name})
    if methods and all("[" in name for name in verdict.failed):
        maps = f"the {', '.join(methods)} map{'s move' if len(methods) > 1 else ' moves'}"
        return (f"{maps} more under {precision} rounding than the first method's, which passes; export those "
                "methods in fp32 only (a separate artifact)")
    if precision == "int8":
        return (f"int8 activation ranges calibrated on {calibration_images} images do not fit the judged images: "
                "calibrate on more images that look like the data (--calibration-images, --calibrate), or use "
                "fp16 / bf16")
    front = (verdict.notes or {}).get("fp32_front")
    if precision == "fp16" and front and front.get("convolutions"):
        return (f"rounding error grows through the backbone even with its first {front['convolutions']} of "
                f"{front['of']} convolutions kept in fp32; export fp32")
    if precision == "bf16":
        return ("bf16 keeps 8 significant bits and this model amplifies rounding errors through its layers (large "
                "BatchNorm gains do); run it in fp32, or fp16 (whose export keeps the backbone's front in fp32 "
                "when that helps)")
    if "top1_agreement_beyond_ties" in verdict.failed:
        return (f"{f['top1_changed'] - f['top1_changed_near_ties']} images change their top-1 class by margins up to "
                f"{f['top1_largest_margin_changed']:.1%} of fp32's largest score")
    return f"{precision} rounding moves the CAMs of this model more than the limits allow"


def file_label(label: str, precision: str) -> str:
    """A judged file as messages name it: its label, with the precision added when the label does not say it."""
    return label if precision in label else f"{label} ({precision})"


def refusal(label: str, verdict: Verdict, calibration_images: int = 0) -> str:
    """Why the gate refused a file, in one line: which figure failed, and the likely cause."""
    figures = judged(verdict.precision, verdict.figures)
    failed = ", ".join(f"{name} {figures[name][0]:.4f} < {figures[name][1]}" for name in verdict.failed)
    return (f"{file_label(label, verdict.precision)} misses the precision gate: {failed} ({summary(verdict.figures)}); "
            f"likely cause: {likely_cause(verdict, calibration_images)}")
