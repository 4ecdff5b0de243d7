"""The read-only web dashboard: a separate process that reads the provenance database, the raw
slices and the outputs, and shows the run in a browser (``nrrn-daemon dashboard``).

:mod:`.data` (what the pages show, from the database), :mod:`.previews` (PNG previews of the
TIFFs), :mod:`.plots` (server-rendered SVG), :mod:`.pages` (HTML skeletons) and
``static/dashboard.js`` (polling, strip, viewer), :mod:`.app` (the Starlette app, read-only and
path-safe) and :mod:`.server` (address and token checks, uvicorn).
"""
