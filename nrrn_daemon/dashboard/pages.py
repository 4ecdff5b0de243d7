"""The dashboard's HTML pages: static skeletons that ``static/dashboard.js`` fills from the API.

No inline script or style (the Content-Security-Policy allows only the server's own files); what
a page needs to know (its data set) is in ``data-`` attributes of ``<body>``.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote


def _page(title: str, body_attrs: str, main: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · nrrn-daemon</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head><body {body_attrs}>
<header><a href="/">nrrn-daemon</a> <span class="sep">/</span> {escape(title)}
<nav><a href="/models">models</a></nav><span id="live" class="live">…</span></header>
<main>{main}</main>
</body></html>
"""


def index() -> str:
    """The list of data sets."""
    return _page(
        "data sets",
        'data-page="index"',
        '<section><h2>Data sets</h2><ul id="datasets"><li>loading…</li></ul>'
        '<p id="waiting" class="muted"></p></section>',
    )


def dataset(name: str) -> str:
    """One data set: status, pace, the strip, the viewer and the plots."""
    q = quote(name, safe="")
    return _page(
        name,
        f'data-page="dataset" data-dataset="{escape(name)}" data-q="{escape(q)}"',
        f"""
<section class="cards">
  <div class="card"><h3>Daemon</h3><dl id="run"></dl></div>
  <div class="card"><h3>Pace</h3><p id="pace" class="big">…</p><dl id="pace-detail"></dl></div>
  <div class="card"><h3>Model</h3><dl id="model"></dl></div>
  <div class="card"><h3>Quality</h3><dl id="quality"></dl></div>
</section>
<section><h2>Slices along z</h2>
  <div id="legend" class="legend">
    <span class="cell denoised"></span>denoised <span class="cell re-denoised"></span>re-denoised
    <span class="cell waiting"></span>waiting for a neighbour
    <span class="cell arriving"></span>arriving <span class="cell failed"></span>failed
    <span class="cell flagged-demo"></span>noise flagged</div>
  <div id="strip" class="strip"></div>
  <ul id="failed" class="failed"></ul>
</section>
<section><h2>Slice <span id="viewer-name">…</span>
  <label class="follow"><input type="checkbox" id="follow" checked> follow the newest</label>
  <label class="follow"><input type="checkbox" id="swipe"> swipe</label></h2>
  <div class="viewer-wrap">
    <div id="viewer" class="viewer">
      <figure class="pane" id="pane-raw"><figcaption>raw</figcaption>
        <div class="frame"><img id="img-raw" alt="raw slice" draggable="false"></div></figure>
      <figure class="pane" id="pane-den"><figcaption>denoised</figcaption>
        <div class="frame"><img id="img-den" alt="denoised slice" draggable="false"></div></figure>
      <input type="range" id="swipe-pos" min="0" max="100" value="50" hidden>
    </div>
    <aside id="provenance" class="provenance"></aside>
  </div>
  <p class="muted">Wheel to zoom, drag to pan (both panes move together); double-click resets.</p>
</section>
<section class="plots"><h2>Over time and over z</h2>
  <img id="plot-latency" alt="latency plot" src="/api/datasets/{q}/plots/latency.svg">
  <img id="plot-throughput" alt="throughput plot" src="/api/datasets/{q}/plots/throughput.svg">
  <img id="plot-noise" alt="noise plot" src="/api/datasets/{q}/plots/noise.svg">
</section>
""",
    )


def models() -> str:
    """Model versions and fine-tune runs of every data set."""
    return _page("models", 'data-page="models"', '<div id="models">loading…</div>')
