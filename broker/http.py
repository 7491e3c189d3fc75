"""The broker's HTTP side (aiohttp): statistics and health.

    GET /stats            every topic's stats, and broker-wide counters
    GET /stats/<topic>    one topic's stats; 404 with a JSON error if the topic is unknown
    GET /healthz          200 while the broker is serving; 503 while a topic's log cannot be written
    GET /readyz           200 while serving, 503 once a drain has begun
    GET /metrics          Prometheus text format (broker.metrics)
    GET /topics/<topic>/stream   new messages as Server-Sent Events ("data: <json>" each); a
                          subscriber whose queue overflowed gets `event: missed` with the count

Every error, including unknown paths and wrong methods, is a JSON object {"error": ...}.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

log = logging.getLogger("broker.http")

BROKER = web.AppKey("broker", object)


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


async def _all_stats(request: web.Request) -> web.Response:
    return json_response(request.app[BROKER].stats())


async def _topic_stats(request: web.Request) -> web.Response:
    name = request.match_info["topic"]
    stats = request.app[BROKER].topic_stats(name)
    if stats is None:
        return json_response({"error": f"unknown topic {name!r}"}, status=404)
    return json_response(stats)


async def _healthz(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    if not broker.healthy:
        errors = {name: t.log.error for name, t in broker.topics.items() if t.log is not None and t.log.error}
        return json_response({"status": "unhealthy", "log_errors": errors}, status=503)
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[BROKER].draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready"})


async def _stream(request: web.Request) -> web.StreamResponse:
    broker = request.app[BROKER]
    name = request.match_info["topic"]
    topic = broker.topics.get(name)
    if topic is None:
        return json_response({"error": f"unknown topic {name!r}"}, status=404)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sub = broker.add_sse_subscriber(topic)
    try:
        await response.write(b": subscribed to " + name.encode() + b"\n\n")
        while True:
            span, missed = await sub.queue.get()
            head = b'event: missed\ndata: {"missed":%d}\n\n' % missed if missed else b""
            await response.write(head + b"data: " + span.body.replace(b"\n", b"\n\ndata: ") + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client left, or the broker is closing
    finally:
        broker.remove_subscriber(topic, sub)
    return response


async def _metrics(request: web.Request) -> web.Response:
    from .metrics import CONTENT_TYPE

    return web.Response(body=request.app[BROKER].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def make_app(broker) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[BROKER] = broker
    app.router.add_get("/stats", _all_stats)
    app.router.add_get("/stats/{topic}", _topic_stats)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/topics/{topic}/stream", _stream)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_http(broker, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the broker's app on host:port (0 picks a free port); returns the runner and the base URL."""
    return await serve_app(make_app(broker), host, port)


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve an app on host:port (0 picks a free port) in the running loop; (runner, base URL).
    Raises OSError if the address cannot be bound."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"
