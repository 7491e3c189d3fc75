"""What both commands' HTTP servers share (the broker's, broker.http, and the streamer's own,
streamer.health): JSON answers, JSON for every error, the token check in front of an app, and
serving it (HTTP or HTTPS) in the running event loop."""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from .httpauth import tls_context, token_middleware

log = logging.getLogger("http")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return json_response({"error": exc.reason, "path": request.path}, status=exc.status)
    except Exception:
        log.exception("HTTP: error while answering %s %s", request.method, request.path)
        return json_response({"error": "internal error"}, status=500)


def secured_app(security, *middlewares) -> web.Application:
    """An application that wants the token first (if there is one), then runs `middlewares`."""
    first = [token_middleware(security.token)] if security.token else []
    return web.Application(middlewares=[*first, *middlewares])


async def serve_app(app: web.Application, host: str, port: int, shutdown_timeout: float = 60.0, security=None) -> tuple[web.AppRunner, str]:
    """Serve an app on host:port (0 picks a free port) in the running loop, over HTTPS if
    `security` (broker.config.HttpSecurity) has a certificate; (runner, base URL). At cleanup, handlers still running after
    `shutdown_timeout` s are cancelled. Raises OSError if the address cannot be bound,
    HttpSecurityError if the certificate cannot be used."""
    ssl_context = tls_context(security.tls_cert, security.tls_key) if security is not None and security.tls_cert else None
    # handler_cancellation: a stream's handler ends when its client leaves, not at its next write
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"{'https' if ssl_context else 'http'}://{shown}:{bound_port}"
