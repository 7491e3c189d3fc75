"""The web console: one static page (static/: index.html, app.js, style.css) that reads the
JSON endpoints and the Server-Sent Events stream of whichever process serves it (the broker, or the
streamer's own HTTP with --broker-url). No build step, nothing from a CDN.

    GET /                   the page
    GET /console/<file>     its script and style sheet

These are the paths that never need a token (the page asks for one when an API answer is 401).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

DIRECTORY = Path(__file__).parent / "static"
STATIC_PREFIX = "/console/"
PUBLIC_PATHS = ("/", STATIC_PREFIX)  # "/" exactly, and everything under /console/
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # the page loads nothing but its own files and talks to nothing but its own origin
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'",
}


def is_public(path: str) -> bool:
    """True for the console's own files, which are served without a token."""
    return path == "/" or path.startswith(STATIC_PREFIX)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DIRECTORY / "index.html", headers=_HEADERS)


def add_console(app: web.Application) -> None:
    """Serve the console on `app`: GET / and GET /console/<file>."""
    app.router.add_get("/", _index)
    app.router.add_static(STATIC_PREFIX, DIRECTORY, append_version=False)
