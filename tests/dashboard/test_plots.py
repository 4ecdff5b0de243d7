"""The server-rendered SVG plots: parseable, every point inside the frame, ticks cover the data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from nrrn_daemon.dashboard import plots
from nrrn_daemon.dashboard.plots import Plot, Series, line_plot, nice_ticks, rate_series

NS = "{http://www.w3.org/2000/svg}"
finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(finite, finite)
def test_ticks_cover_the_range(a, b):
    lo, hi = min(a, b), max(a, b)
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-6 and ticks[-1] >= hi - 1e-6 * max(1, abs(hi))
    assert len(ticks) <= 12


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=30))
def test_every_point_is_drawn_inside_the_frame(points):
    svg = line_plot(Plot("t <&>", "x", "y", [Series("s", [list(p) for p in points], dots=True)]))
    root = ET.fromstring(svg)  # well-formed, labels escaped
    assert root.find(f"{NS}title").text == "t <&>"
    frame = root.findall(f"{NS}rect")[1]
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    dots = root.findall(f"{NS}circle")
    assert len(dots) == len(points)
    for c in dots:
        assert x0 - 0.1 <= float(c.get("cx")) <= x1 + 0.1
        assert y0 - 0.1 <= float(c.get("cy")) <= y1 + 0.1


def test_an_empty_plot_says_so():
    assert "no data yet" in line_plot(Plot("p", "x", "y", [Series("s", [])]))


def test_rate_is_outputs_per_hour():
    assert rate_series([0.0, 10.0, 20.0, 30.0]) == [[10.0, 360.0], [20.0, 360.0], [30.0, 360.0]]
    assert rate_series([5.0]) == [] and plots.WIDTH > 0
