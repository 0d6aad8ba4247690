"""The web pages (docs/web.md): the landing page at /, the user dashboard at /app, the operations
console at /app/console, and the scripts and styles they load. Pages are rendered once per
process (they hold no user data: the scripts fetch it from /api/v1 with the user's token)."""

from __future__ import annotations

import functools

from quart import Response

from api import _web as web
from api._openapi import Operation, Resource
from api._problems import Problem

bp = Resource("web", __name__)
_HTML = "text/html; charset=utf-8"


def _page(summary: str) -> Operation:
    return Operation(summary, 200, "text/html", auth=False, backend=False)


def _asset(summary: str, media: str) -> Operation:
    return Operation(summary, 200, media, auth=False, backend=False, errors=(404,))


@functools.cache
def _rendered(template: str) -> bytes:
    context = {"figures": web.figures()} if template == "landing.html" else {}
    return web.environment().get_template(template).render(**context).encode()


def _html(template: str) -> Response:
    response = Response(_rendered(template), content_type=_HTML)
    response.headers["Content-Security-Policy"] = web.CSP
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.operation("GET", "/", _page("The landing page: what Kizo does, measured figures, how to run"))
async def landing() -> Response:
    return _html("landing.html")


@bp.operation("GET", "/app", _page("The user dashboard (a page; its script calls /api/v1)"))
async def dashboard() -> Response:
    return _html("dashboard.html")


@bp.operation("GET", "/app/console", _page("The operations console for admins (a page)"))
async def console() -> Response:
    return _html("console.html")


def _static(name: str) -> Response:
    found = web.static_files().get(name)
    if found is None:
        raise Problem(404, "Not found", "no such file")
    body, media = found
    return Response(body, content_type=media)


@bp.operation("GET", "/app/js/<name>.js", _asset("A script module of the pages", "text/javascript"))
async def script(name: str) -> Response:
    return _static(f"js/{name}.js")


@bp.operation("GET", "/app/css/<name>.css", _asset("A style sheet of the pages", "text/css"))
async def style(name: str) -> Response:
    return _static(f"css/{name}.css")
