"""Scatter plots with the Pareto frontier marked, as inline SVG (no script, no external asset)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 20, 50


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float


def pareto_front(points: list[Point], x_higher_better: bool, y_higher_better: bool) -> list[Point]:
    """Points no other point beats on both axes (at least as good on both and better on one), sorted by x."""
    def at_least(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    def dominates(p: Point, q: Point) -> bool:
        return (at_least(p.x, q.x, x_higher_better) and at_least(p.y, q.y, y_higher_better)
                and (p.x != q.x or p.y != q.y))

    return sorted((q for q in points if not any(dominates(p, q) for p in points)), key=lambda p: p.x)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start, end = math.floor(low / step), math.ceil(high / step)
    if end == start:
        end += 1
    return [round(i * step, 12) for i in range(start, end + 1)]


def scatter_svg(points: list[Point], front: list[Point], x_label: str, y_label: str, title: str) -> str:
    """An SVG scatter of `points` with `front` joined by a line and drawn filled."""
    if not points:
        return ""
    frame = _Frame([p.x for p in points], [p.y for p in points])
    sx, sy = frame.sx, frame.sy
    parts = frame.open(x_label, y_label, title)
    if len(front) > 1:
        path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#d9480f" stroke-width="2" '
                     'stroke-dasharray="6 3" class="frontier"/>')
    on_front = {(p.label, p.x, p.y) for p in front}
    placed: list[tuple[float, float]] = []
    for p in sorted(points, key=lambda q: (sy(q.y), sx(q.x))):
        best = (p.label, p.x, p.y) in on_front
        x, y = sx(p.x), sy(p.y)
        label_y = y - 6
        while any(abs(label_y - ly) < 12 and abs(x - lx) < 7 * max(len(p.label), 8) for lx, ly in placed):
            label_y += 13  # a label would sit on another: move it below
        placed.append((x, label_y))
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" class="point" '
                     f'fill="{"#d9480f" if best else "#fff"}" stroke="{"#d9480f" if best else "#1c7ed6"}" '
                     f'stroke-width="2"><title>{escape(p.label)}: {p.x:.4g}, {p.y:.4g}</title></circle>'
                     f'<text x="{x + 8:.1f}" y="{label_y:.1f}" class="label">{escape(p.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


class _Frame:
    """The axes of a plot: round ticks covering the values, data-to-pixel maps, and the SVG that opens it."""

    def __init__(self, xs: list[float], ys: list[float]):
        self.xs, self.ys = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
        self.width, self.height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(self, x: float) -> float:
        return LEFT + (x - self.xs[0]) / (self.xs[-1] - self.xs[0]) * self.width

    def sy(self, y: float) -> float:
        return TOP + self.height - (y - self.ys[0]) / (self.ys[-1] - self.ys[0]) * self.height

    def open(self, x_label: str, y_label: str, title: str) -> list[str]:
        """The SVG element, the plot area, the grid with its tick labels and the axis labels."""
        plot_w, plot_h = self.width, self.height
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{WIDTH}" height="{HEIGHT}" '
                 f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
                 f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
        for x in self.xs:
            parts.append(f'<line x1="{self.sx(x):.1f}" y1="{TOP}" x2="{self.sx(x):.1f}" y2="{TOP + plot_h}" '
                         f'stroke="#e4e4e4"/><text x="{self.sx(x):.1f}" y="{TOP + plot_h + 16}" '
                         f'text-anchor="middle">{_tick(x)}</text>')
        for y in self.ys:
            parts.append(f'<line x1="{LEFT}" y1="{self.sy(y):.1f}" x2="{LEFT + plot_w}" y2="{self.sy(y):.1f}" '
                         f'stroke="#e4e4e4"/><text x="{LEFT - 6}" y="{self.sy(y) + 4:.1f}" '
                         f'text-anchor="end">{_tick(y)}</text>')
        parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>'
                     f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                     f'{escape(y_label)}</text>')
        return parts


def _tick(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2g}"


COLOURS = ("#1c7ed6", "#d9480f", "#2b8a3e", "#ae3ec9", "#f59f00", "#0b7285", "#c2255c", "#5c940d", "#495057")


def line_svg(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, title: str) -> str:
    """An SVG line chart: one polyline per named series of (x, y) points, with a legend on the right."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    frame = _Frame([x for x, _ in points], [y for _, y in points])
    sx, sy = frame.sx, frame.sy
    parts = frame.open(x_label, y_label, title)
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" class="series">'
                     f'<title>{escape(name)}</title></polyline>')
        legend_y = TOP + 14 + 16 * index
        parts.append(f'<line x1="{WIDTH - RIGHT + 10}" y1="{legend_y - 4}" x2="{WIDTH - RIGHT + 28}" '
                     f'y2="{legend_y - 4}" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{WIDTH - RIGHT + 32}" y="{legend_y}" class="label">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
