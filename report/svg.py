"""Plots as small inline SVG, written by hand: a histogram, a bar chart and a line chart are a few dozen lines each,
render crisply at any zoom, weigh a few kilobytes, and need no plotting library in the install."""
from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

PALETTE = ("#3b6fb6", "#d1495b", "#8a8a8a", "#edae49", "#66a182", "#7e5ca8")
_W, _H = 360, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 10, 40, 36


def _frame(title: str, body: list[str], legend: Sequence[tuple[str, str]] = (), width: int = _W,
           height: int = _H) -> str:
    items = [f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    shown = title if len(title) <= 58 else title[:57] + "…"
    items.append(f'<text x="8" y="15" class="heading">{escape(shown)}</text>')
    items += body
    for i, (name, colour) in enumerate(legend):
        x = _LEFT + i * 110
        items.append(f'<rect x="{x}" y="{_TOP - 17}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{_TOP - 8}" class="legend">{escape(name)}</text>')
    items.append("</svg>")
    return "".join(items)


def _axes(y_max: float, x_labels: Sequence[tuple[float, str]], width: int = _W, height: int = _H,
          y_format: str = "{:g}") -> list[str]:
    """Axis lines, three y gridlines with values, and x labels at given fractions of the plot width."""
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    out = [f'<line x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}" class="axis"/>',
           f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}" class="axis"/>']
    for f in (0.5, 1.0):
        y = _TOP + ph * (1 - f)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                   f'{escape(y_format.format(y_max * f))}</text>')
    out.append(f'<text x="{_LEFT - 4}" y="{_TOP + ph + 4}" class="tick" text-anchor="end">0</text>')
    for f, label in x_labels:
        out.append(f'<text x="{_LEFT + pw * f:.1f}" y="{_TOP + ph + 16}" class="tick" text-anchor="middle">'
                   f'{escape(label)}</text>')
    return out


def histogram(series: dict[str, np.ndarray], lo: float, hi: float, title: str, x_label: str,
              bins: int = 20) -> str:
    """Stacked histogram of one or more series over [lo, hi] (values outside are clipped into the end bins)."""
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(np.clip(v[np.isfinite(v)], lo, hi), edges)[0] for v in series.values()]
    total = np.sum(counts, axis=0) if counts else np.zeros(bins)
    y_max = max(1, int(total.max()))
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    body = _axes(y_max, [(0, f"{lo:g}"), (0.5, f"{(lo + hi) / 2:g}"), (1, f"{hi:g}")])
    base = np.zeros(bins)
    for (name, _), c, colour in zip(series.items(), counts, PALETTE):
        for i, n in enumerate(c):
            if n:
                x = _LEFT + pw * i / bins
                y0 = _TOP + ph * (1 - (base[i] + n) / y_max)
                body.append(f'<rect x="{x + 0.5:.1f}" y="{y0:.1f}" width="{pw / bins - 1:.1f}" '
                            f'height="{ph * n / y_max:.1f}" fill="{colour}"><title>{escape(name)}: {n} in '
                            f'[{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>')
        base += c
    body.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 4}" class="label" text-anchor="middle">{escape(x_label)}</text>')
    legend = [(name, colour) for name, colour in zip(series, PALETTE)] if len(series) > 1 else []
    return _frame(title, body, legend)


def bars(values: dict[str, float | None], title: str, y_max: float = 1.0, percent: bool = True) -> str:
    """One bar per category (a class, a method); missing values leave a gap."""
    names = list(values)
    width = max(_W, _LEFT + _RIGHT + 28 * len(names))
    pw, ph = width - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    body = _axes(y_max, [], width=width, y_format="{:.0%}" if percent else "{:g}")
    step = pw / max(1, len(names))
    for i, name in enumerate(names):
        v = values[name]
        x = _LEFT + step * i
        label = name if len(name) <= 10 else name[:9] + "…"
        body.append(f'<text x="{x + step / 2:.1f}" y="{_TOP + ph + 14}" class="tick" text-anchor="middle">'
                    f'{escape(label)}</text>')
        if v is None:
            continue
        height = ph * min(max(v, 0.0), y_max) / y_max
        shown = f"{v:.1%}" if percent else f"{v:.3g}"
        body.append(f'<rect x="{x + step * 0.15:.1f}" y="{_TOP + ph - height:.1f}" width="{step * 0.7:.1f}" '
                    f'height="{height:.1f}" fill="{PALETTE[0]}"><title>{escape(name)}: {shown}</title></rect>')
    return _frame(title, body, width=width)


def lines(series: dict[str, Sequence[float]], title: str, x_label: str, y_max: float | None = None) -> str:
    """Curves sampled at evenly spaced x from 0 to 1 (the deletion and insertion curves)."""
    finite = [float(v) for s in series.values() for v in s if v is not None and np.isfinite(v)]
    top = y_max if y_max is not None else max(finite + [1e-9]) * 1.05
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    body = _axes(top, [(0, "0"), (0.5, "0.5"), (1, "1")], y_format="{:.2g}")
    for (name, values), colour in zip(series.items(), PALETTE):
        k = len(values) - 1
        points = " ".join(f"{_LEFT + pw * i / max(k, 1):.1f},{_TOP + ph * (1 - float(v) / top):.1f}"
                          for i, v in enumerate(values))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2">'
                    f'<title>{escape(name)}</title></polyline>')
    body.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 4}" class="label" text-anchor="middle">{escape(x_label)}</text>')
    return _frame(title, body, [(name, colour) for name, colour in zip(series, PALETTE)])
