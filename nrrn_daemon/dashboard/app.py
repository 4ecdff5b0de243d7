"""The dashboard's ASGI app (Starlette): pages, the JSON API, previews and plots; read-only.

Every route answers GET (and HEAD) only; anything else is 405. The database is opened read-only
(:class:`~nrrn_daemon.store.store.Store` with ``readonly=True``: an SQLite ``mode=ro`` URI and
``query_only``), lazily, so the dashboard may start before the daemon has made its database. A
file is only ever read when the database records it as a slice or output of the data set asked
for, the requested name is a plain file name, and the file's real path (symlinks resolved) lies in
that data set's watch folder (raw) or the output folder (denoised): see :func:`inside`.

Pages are static HTML + one script (``static/dashboard.js``) that polls the JSON API every
:data:`POLL_S` seconds and swaps the plots' and previews' URLs when something changed: no reload,
no request to any other host (the ``Content-Security-Policy`` header forbids it too).
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nrrn_daemon.dashboard import data, pages
from nrrn_daemon.dashboard.plots import Plot, Series, line_plot, rate_series
from nrrn_daemon.dashboard.previews import Previews
from nrrn_daemon.errors import DashboardError, InputError, OutputError, StoreError
from nrrn_daemon.files import safe_join
from nrrn_daemon.states import STALE_AFTER_S
from nrrn_daemon.store.store import Store

STATIC = Path(__file__).parent / "static"
POLL_S = 2.0
"""How often the pages ask for news."""
TOKEN_COOKIE = "nrrn_dashboard_token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Content-Security-Policy of every answer: the pages may load nothing from another host."""


@dataclass(frozen=True)
class Settings:
    """What the app serves: the database, the output folder, how previews are rendered."""

    database: Path
    output_folder: Path
    preview_px: int = 1024
    databar: str = "none"
    databar_rows: int = 0
    token: str | None = None
    stale_after_s: float = STALE_AFTER_S


def inside(folder: Path, recorded: str, name: str) -> Path:
    """The recorded file ``recorded`` of a slice called ``name``, if it lies in ``folder``.

    Raises
    ------
    DashboardError
        ``name`` is not a plain file name (``..``, a separator, absolute), or the recorded file,
        symlinks resolved, lies outside ``folder``.
    """
    try:
        safe_join(folder, name)
    except OutputError as exc:
        raise DashboardError(
            f"{name!r} is not a plain file name; give a slice's file name"
        ) from exc
    path = Path(recorded)
    root = Path(folder).resolve()
    if not path.resolve().is_relative_to(root):
        raise DashboardError(
            f"{path} resolves outside the data set's folder {root}; the dashboard reads no file "
            "there (a symlink pointing out of the folder?)"
        )
    return path


class Dashboard:
    """The state behind the routes: the read-only store (opened on first use) and the previews."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.previews = Previews(settings.preview_px, settings.databar, settings.databar_rows)  # type: ignore[arg-type]
        self._store: Store | None = None
        self._lock = threading.Lock()

    def store(self) -> Store:
        """The read-only store (StoreError while the database does not exist yet)."""
        with self._lock:
            if self._store is None:
                self._store = Store(self.settings.database, readonly=True)
            return self._store

    def read(self, doing: str, report: Callable[[Any], Any]) -> Any:
        return self.store().read(doing, report)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _guard(handler: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
    """Run a sync handler in the thread pool; expected failures become JSON errors."""
    from starlette.concurrency import run_in_threadpool

    async def endpoint(request: Request) -> Response:
        try:
            return await run_in_threadpool(handler, request)
        except DashboardError as exc:
            return _error(403 if "outside" in str(exc) else 400, str(exc))
        except StoreError as exc:
            text = str(exc)
            return _error(503 if "no database" in text else 404, text)
        except InputError as exc:
            return _error(422, str(exc))
        except FileNotFoundError as exc:
            return _error(404, f"{exc.filename} is gone from disk")

    return endpoint


def create_app(settings: Settings) -> Starlette:
    """The dashboard app for ``settings`` (see the module docstring)."""
    dash = Dashboard(settings)

    def api_health(request: Request) -> Response:
        facts = {"database": str(settings.database), "readonly": True, "poll_s": POLL_S}
        try:
            names = dash.read("list the data sets", data.datasets)
        except StoreError as exc:
            return JSONResponse({**facts, "datasets": [], "waiting": str(exc)})
        return JSONResponse({**facts, "datasets": names})

    def api_status(request: Request) -> Response:
        return JSONResponse(dash.store().status(), headers={"Cache-Control": "no-store"})

    def api_overview(request: Request) -> Response:
        name = request.path_params["name"]
        report = dash.read(
            "read the overview",
            lambda s: data.overview(s, name, now=time.time(), stale_after_s=settings.stale_after_s),
        )
        return JSONResponse(report)

    def api_series(request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse(dash.read("read the plots' data", lambda s: data.series(s, name)))

    def _slice(request: Request) -> tuple[Any, Any, Any, str]:
        name, wanted = request.path_params["name"], request.query_params.get("slice", "")
        ds, row, out = dash.read("read a slice", lambda s: data.slice_row(s, name, wanted))
        return ds, row, out, wanted

    def api_slice(request: Request) -> Response:
        ds, row, out, wanted = _slice(request)
        inside(Path(ds.watch_folder), row.path, wanted)
        report = dash.store().provenance(row.path) if out is not None else {"outputs": []}
        current = next((o for o in report["outputs"] if o["is_current"]), None)
        return JSONResponse({
            "dataset": ds.name, "name": row.name, "index": row.index, "scan": row.scan,
            "state": data.strip_state(row.state, out.version if out is not None else None),
            "reason": row.reason, "current": current,
            "versions": len(report["outputs"]),
        })  # fmt: skip

    def api_preview(request: Request) -> Response:
        ds, row, out, wanted = _slice(request)
        kind = request.query_params.get("kind", "raw")
        raw = inside(Path(ds.watch_folder), row.path, wanted)
        if kind == "raw":
            path = raw
        elif kind == "denoised":
            if out is None:
                return _error(404, f"{wanted} has no denoised output yet")
            path = inside(settings.output_folder, out.path, Path(out.path).name)
        else:
            return _error(400, f"kind must be raw or denoised, not {kind!r}")
        png = dash.previews.render(path, raw)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    def plot_svg(request: Request) -> Response:
        name, which = request.path_params["name"], request.path_params["which"]
        series = dash.read("read the plots' data", lambda s: data.series(s, name))
        if which == "latency":
            plot = Plot("Latency (slice complete → output written)", "time (UTC)", "seconds",
                        [Series("latency", series["latency"], dots=True)], time_x=True)  # fmt: skip
        elif which == "throughput":
            times = [p[0] for p in series["finished"]]
            plot = Plot("Throughput", "time (UTC)", "slices per hour",
                        [Series("outputs / h", rate_series(times))], time_x=True)  # fmt: skip
        elif which == "noise":
            plot = Plot(
                "Noise estimate over z (σ, grey levels)", "slice index", "σ",
                [Series("input", series["noise_in"], "#ff7f0e"),
                 Series("output", series["noise_out"], "#2ca02c")],
                marks=series["flagged"],
            )  # fmt: skip
        else:
            return _error(404, f"no plot {which!r}: latency, throughput or noise")
        return Response(line_plot(plot), media_type="image/svg+xml")

    def api_models(request: Request) -> Response:
        return JSONResponse(dash.read("read the models", data.models))

    def loss_svg(request: Request) -> Response:
        name = request.path_params["name"]
        report = dash.read("read the models", data.models)
        ds = next((d for d in report["datasets"] if d["name"] == name), None)
        if ds is None:
            return _error(404, f"no data set named {name!r}")
        runs = list(reversed(ds["finetunes"]))
        parent = [[k, r["val_loss_parent"]] for k, r in enumerate(runs) if r["val_loss_parent"]]
        cand = [[k, r["val_loss_candidate"]] for k, r in enumerate(runs)
                if r["val_loss_candidate"]]  # fmt: skip
        plot = Plot("Validation loss per fine-tune", "fine-tune run (oldest first)", "loss",
                    [Series("parent", parent, "#1f77b4", dots=len(parent) < 3),
                     Series("candidate", cand, "#ff7f0e", dots=len(cand) < 3)])  # fmt: skip
        return Response(line_plot(plot), media_type="image/svg+xml")

    def page(render: Callable[..., str]) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            return HTMLResponse(render(**request.path_params))

        return handler

    routes = [
        Route("/", _guard(page(pages.index))),
        Route("/datasets/{name:path}", _guard(page(pages.dataset))),
        Route("/models", _guard(page(pages.models))),
        Route("/api/health", _guard(api_health)),
        Route("/api/status", _guard(api_status)),
        Route("/api/models", _guard(api_models)),
        # data set names are often folder paths: {name:path}, the overview last
        Route("/api/datasets/{name:path}/series", _guard(api_series)),
        Route("/api/datasets/{name:path}/slice", _guard(api_slice)),
        Route("/api/datasets/{name:path}/preview.png", _guard(api_preview)),
        Route("/api/datasets/{name:path}/plots/{which}.svg", _guard(plot_svg)),
        Route("/api/datasets/{name:path}/loss.svg", _guard(loss_svg)),
        Route("/api/datasets/{name:path}", _guard(api_overview)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            dash.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.dashboard = dash
    return TokenGate(SecurityHeaders(app), settings.token)  # type: ignore[return-value]


class SecurityHeaders:
    """ASGI middleware: a strict Content-Security-Policy and no sniffing on every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenGate:
    """ASGI middleware: with a token, every request must carry it (``Authorization: Bearer``,
    ``?token=`` — which also sets an HttpOnly cookie — or that cookie); else 401."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    def _presented(self, scope: dict[str, Any]) -> tuple[str | None, bool]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], True
        cookie = SimpleCookie(headers.get("cookie", ""))
        if TOKEN_COOKIE in cookie:
            return cookie[TOKEN_COOKIE].value, False
        return None, False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        given, from_query = self._presented(scope)
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            response = _error(401, "this dashboard needs its token: open it with ?token=...")
            await response(scope, receive, send)
            return
        if not from_query:
            await self.app(scope, receive, send)
            return

        async def set_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                value = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", value.encode())]
            await send(message)

        await self.app(scope, receive, set_cookie)
