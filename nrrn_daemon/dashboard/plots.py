"""Server-rendered SVG plots: no plotting library in the browser, nothing fetched at run time.

One function, :func:`line_plot`: a few series of ``(x, y)`` points drawn as lines or dots over
axes with round-numbered ticks, optional red marks (flagged slices), and a legend. Times on the
x axis are drawn as UTC clock times. The SVG is plain text: its ``<title>`` and the series
labels are searchable, and a browser shows it as an ``<img>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 28, 34


@dataclass
class Series:
    """One line (or dots) of a plot."""

    label: str
    points: Sequence[Sequence[float]]
    colour: str = "#1f77b4"
    dots: bool = False


@dataclass
class Plot:
    """What :func:`line_plot` draws."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    marks: Sequence[Sequence[float]] = ()
    """Points drawn as red rings on top (e.g. flagged slices)."""
    time_x: bool = False
    """x values are seconds since the epoch: ticks are shown as HH:MM:SS (UTC)."""


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi - lo < 1e-9 * max(1.0, abs(lo), abs(hi)):  # one value (or a rounding's worth)
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    # the slack absorbs float rounding of lo / step only (1e-9 of a step hid a value below 0)
    first, last = math.floor(lo / step + 1e-12), math.ceil(hi / step - 1e-12)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _label(value: float, time_x: bool) -> str:
    if time_x:
        return datetime.fromtimestamp(value, tz=UTC).strftime("%H:%M:%S")
    return f"{value:g}"


def line_plot(plot: Plot) -> str:
    """The SVG document of ``plot`` (an empty frame saying "no data yet" when it has no point)."""
    points = [p for s in plot.series for p in s.points]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(plot.title)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{_LEFT}" y="16" font-size="13" font-weight="bold">{escape(plot.title)}</text>',
    ]
    if not points:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#777">'
                   "no data yet</text></svg>")  # fmt: skip
        return "".join(out)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return _TOP + ph - (y - y0) / (y1 - y0) * ph

    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="none" '
               'stroke="#999"/>')  # fmt: skip
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{_TOP}" y2="{_TOP + ph}" '
                   f'stroke="#eee"/><text x="{sx(t):.1f}" y="{_TOP + ph + 14}" '
                   f'text-anchor="middle">{_label(t, plot.time_x)}</text>')  # fmt: skip
    for t in yt:
        out.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{_LEFT - 4}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end">{t:g}</text>')  # fmt: skip
    out.append(f'<text x="{_LEFT + pw / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
               f"{escape(plot.xlabel)}</text>")  # fmt: skip
    out.append(f'<text transform="translate(12 {_TOP + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(plot.ylabel)}</text>')  # fmt: skip
    for k, s in enumerate(plot.series):
        coords = [(sx(p[0]), sy(p[1])) for p in s.points]
        if s.dots or len(coords) == 1:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{s.colour}"/>'
                    for x, y in coords]  # fmt: skip
        else:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" '
                       'stroke-width="1.5"/>')  # fmt: skip
        lx = _LEFT + pw - 150
        ly = _TOP + 12 + 14 * k
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{s.colour}"/>'
                   f'<text x="{lx + 14}" y="{ly + 1}">{escape(s.label)}</text>')  # fmt: skip
    for p in plot.marks:
        out.append(f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[1]):.1f}" r="6" fill="none" '
                   'stroke="#d62728" stroke-width="2"><title>flagged</title></circle>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def rate_series(times: Sequence[float], window: int = 10) -> list[list[float]]:
    """Outputs per hour over time: at each output, the rate over the last ``window`` of them
    (fewer at the start), ``(n - 1) / (t_last - t_first)``."""
    times = sorted(times)
    out = []
    for k in range(1, len(times)):
        first = max(0, k - window + 1)
        span = times[k] - times[first]
        if span > 0:
            out.append([times[k], (k - first) * 3600.0 / span])
    return out
