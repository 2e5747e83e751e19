"""The PNG chart: img/s by contender and batch size, readable at a glance, drawn with Pillow alone.

Grouped bars per batch size (Grad-CAM solid, its forward-only limit pale beside it, same colour per runtime), min–max
whiskers, the reference as a red line and the 20x-reference target as a dashed one, the best configuration in the
title.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from gradcam_engine.bench.report.markdown import SPEEDUP_TARGET, best_gradcam

WIDTH, HEIGHT = 1400, 820
LEFT, RIGHT, TOP, BOTTOM = 110, 380, 120, 90
_RUNTIME_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (23, 190, 207), (188, 189, 34)]
_E2E_COLOURS = {"end-to-end": (70, 70, 70), "model-only": (170, 170, 170)}
RED = (214, 39, 40)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _pale(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.55) for c in colour)  # type: ignore[return-value]


def _nice_max(value: float) -> float:
    step = 10 ** len(str(int(max(value, 1)))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * step:
            return m * step
    return 10 * step


def _series(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Bars in legend order: each Grad-CAM runtime then its forward-only, then end to end and model-only."""
    rows = [r for r in report["results"] if r["images_per_second"] and r["kind"] != "reference"]
    runtimes = sorted({(r["runtime"], r["precision"]) for r in rows if r["group"] == "model"})
    series = []
    for i, (runtime, precision) in enumerate(runtimes):
        colour = _RUNTIME_COLOURS[i % len(_RUNTIME_COLOURS)]
        for kind, fill in (("gradcam", colour), ("forward", _pale(colour))):
            bars = {r["batch_size"]: r for r in rows if (r["runtime"], r["precision"], r["kind"]) ==
                    (runtime, precision, kind)}
            if bars:
                name = next(iter(bars.values()))["contender"]
                series.append({"label": name, "fill": fill, "outline": colour, "bars": bars})
    end_to_end = sorted({(r["runtime"], r["precision"]) for r in rows if r["group"] == "end-to-end"})
    for runtime, precision in end_to_end:  # one pair of bars per runtime and precision, grey as the table's
        for kind, fill in _E2E_COLOURS.items():
            bars = {r["batch_size"]: r for r in rows if (r["kind"], r["runtime"], r["precision"]) ==
                    (kind, runtime, precision)}
            if bars:
                series.append({"label": f"{kind.replace('-', ' ')}, {runtime} {precision}", "fill": fill,
                               "outline": (40, 40, 40), "bars": bars})
    return series


def _dashed(draw: ImageDraw.ImageDraw, y: float, x0: int, x1: int, colour: tuple[int, int, int], dash: int) -> None:
    for x in range(x0, x1, 2 * dash):
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=3)


def draw_chart(report: dict[str, Any], path: Path) -> Path:
    """Write the PNG; returns its path."""
    series = _series(report)
    reference = next((r for r in report["results"] if r["kind"] == "reference" and r["images_per_second"]), None)
    batch_sizes = sorted({b for s in series for b in s["bars"]})
    peak = max([r["images_per_second_max"] or 0 for s in series for r in s["bars"].values()] +
               [reference["images_per_second"] * SPEEDUP_TARGET * 1.05 if reference else 0, 1e-3])
    top = _nice_max(peak * 1.1)
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    title, small, tiny = _font(30), _font(19), _font(16)
    model = report["model"]
    machine = report["machine"]
    draw.text((LEFT, 18), f"Grad-CAM throughput: {model['name']} {model['input_size'][0]}x{model['input_size'][1]}"
              f" - images/second, higher is better", fill="black", font=title)
    best = best_gradcam(report)
    subtitle = (f"best: {best['contender']} batch {best['batch_size']}: {best['images_per_second']:.1f} img/s"
                + (f" = {best['vs_reference']:.0f}x the per-image reference" if best.get("vs_reference") else "")
                if best else "no Grad-CAM contender measured")
    draw.text((LEFT, 62), subtitle, fill=(60, 60, 60), font=small)
    draw.text((LEFT, 88), f"{machine['cpu']}, {machine['usable_cores']} cores, "
              f"{', '.join(machine['gpus']) or 'no GPU'}; bars: median, whiskers: min-max", fill=(110, 110, 110),
              font=tiny)

    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP + 20, HEIGHT - BOTTOM
    scale = (y1 - y0) / top
    for i in range(6):
        value = top * i / 5
        y = y1 - value * scale
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225), width=1)
        draw.text((x0 - 12, y), f"{value:g}", fill="black", font=small, anchor="rm")
    draw.text((24, (y0 + y1) / 2), "img/s", fill="black", font=small, anchor="lm")
    group_w = (x1 - x0) / max(len(batch_sizes), 1)
    for g, b in enumerate(batch_sizes):
        members = [s for s in series if b in s["bars"]]
        bar_w = min(70.0, group_w * 0.8 / max(len(members), 1))
        start = x0 + g * group_w + (group_w - bar_w * len(members)) / 2
        for j, s in enumerate(members):
            r = s["bars"][b]
            left, right = start + j * bar_w + 2, start + (j + 1) * bar_w - 2
            y = y1 - r["images_per_second"] * scale
            draw.rectangle([left, y, right, y1], fill=s["fill"], outline=s["outline"], width=2)
            mid = (left + right) / 2
            lo, hi = y1 - r["images_per_second_min"] * scale, y1 - r["images_per_second_max"] * scale
            draw.line([(mid, lo), (mid, hi)], fill=(30, 30, 30), width=2)
            draw.line([(mid - 6, hi), (mid + 6, hi)], fill=(30, 30, 30), width=2)
            lift = 20 if bar_w < 56 and j % 2 else 0  # narrow bars: stagger the labels so neighbours never touch
            draw.text((mid, hi - 4 - lift), _short(r["images_per_second"]), fill="black", font=tiny, anchor="md")
        draw.text((x0 + (g + 0.5) * group_w, y1 + 12), f"batch {b}", fill="black", font=small, anchor="mt")
    draw.line([(x0, y1), (x1, y1)], fill="black", width=2)
    draw.line([(x0, y0), (x0, y1)], fill="black", width=2)

    legend_x, legend_y = x1 + 30, y0
    if reference:
        ref = reference["images_per_second"]
        draw.line([(x0, y1 - ref * scale), (x1, y1 - ref * scale)], fill=RED, width=3)
        goal = ref * SPEEDUP_TARGET
        _dashed(draw, y1 - goal * scale, x0, x1, RED, 12)
        box = draw.textbbox((x1 - 6, y1 - goal * scale - 4), f"target {SPEEDUP_TARGET:g}x reference", font=tiny,
                            anchor="rd")
        draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill="white")
        draw.text((x1 - 6, y1 - goal * scale - 4), f"target {SPEEDUP_TARGET:g}x reference", fill=RED, font=tiny,
                  anchor="rd")
        draw.line([(legend_x, legend_y + 10), (legend_x + 34, legend_y + 10)], fill=RED, width=3)
        draw.text((legend_x + 44, legend_y), f"reference, per image: {ref:.2f} img/s", fill="black", font=tiny)
        legend_y += 28
        _dashed(draw, legend_y + 10, legend_x, legend_x + 34, RED, 8)
        draw.text((legend_x + 44, legend_y), f"target: {SPEEDUP_TARGET:g}x reference = {goal:.1f}", fill="black",
                  font=tiny)
        legend_y += 38
    for s in series:
        draw.rectangle([legend_x, legend_y + 2, legend_x + 34, legend_y + 20], fill=s["fill"], outline=s["outline"],
                       width=2)
        draw.text((legend_x + 44, legend_y), s["label"], fill="black", font=tiny)
        legend_y += 28
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
