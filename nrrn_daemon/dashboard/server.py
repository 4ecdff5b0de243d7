"""Serve the dashboard with uvicorn, after checking the address and the token.

It binds to 127.0.0.1 unless told otherwise; any address that is not a loopback one (another
interface, ``0.0.0.0``, a host name) needs a token (``--token`` or ``dashboard.token``), since
anyone on the network could otherwise look at the run.
"""

from __future__ import annotations

import ipaddress
import socket

from nrrn_daemon.dashboard.app import Settings, create_app
from nrrn_daemon.errors import DashboardError

MIN_TOKEN = 16
"""Shortest token accepted (characters)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token, or with a short one.

    Raises
    ------
    DashboardError
        What is wrong and what to give.
    """
    if token is not None and len(token) < MIN_TOKEN:
        raise DashboardError(
            f"the dashboard token is {len(token)} characters; give at least {MIN_TOKEN} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
        )
    if not is_loopback(host) and token is None:
        raise DashboardError(
            f"--host {host} is not a loopback address: anyone who reaches it could watch the "
            "run; give --token (or dashboard.token in the profile), or keep --host 127.0.0.1"
        )
    if not 1 <= port <= 65535:
        raise DashboardError(f"--port {port} is not a TCP port (1-65535)")


def url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"


def serve(settings: Settings, host: str, port: int) -> None:
    """Check the address, then serve until interrupted (uvicorn handles SIGINT / SIGTERM).

    Raises
    ------
    DashboardError
        The address or token is refused, or the port cannot be bound.
    """
    import uvicorn

    check_bind(host, port, settings.token)
    try:  # a clear line for a busy port, before uvicorn logs its own traceback-free exit
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
    except OSError as exc:
        raise DashboardError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
        ) from exc
    uvicorn.run(create_app(settings), host=host.strip("[]"), port=port, log_level="warning",
                access_log=False, server_header=False)  # fmt: skip
