"""The broker's HTTP side (aiohttp): statistics, health, the live stream and the web console.

    GET /                 the web console (common.webconsole; its files under /console/)
    GET /stats            every topic's stats, and broker-wide counters
    GET /stats/<topic>    one topic's stats; 404 with a JSON error if the topic is unknown
    GET /healthz          200 while the broker is serving; 503 while a topic's log cannot be written,
                          or once one of its tasks died (`failure`)
    GET /readyz           200 while serving, 503 once a drain has begun
    GET /metrics          Prometheus text format (broker.metrics)
    GET /topics/<topic>/stream   new messages as Server-Sent Events, one event per message:
                          `id: <offset>` and `data: <json>`; the stream starts with `retry: 2000`.
                          A client that reconnects with `Last-Event-ID: <offset>` gets every
                          message after that offset the topic still holds (its log, or the
                          in-memory window), then the live stream: no gap, no duplicate. What it
                          can no longer get is announced by `event: missed` with
                          {"missed": N, "reason": ...} (N null when unknown: the offset is past
                          the topic's end, as after a restart without persistence). A live
                          reader whose queue overflowed gets `event: missed` {"missed": N}. When the broker
                          shuts down, the stream ends with `event: shutdown`. Beyond --max-sse
                          open streams: 503.

Every error, including unknown paths and wrong methods, is a JSON object {"error": ...}.
With --http-token-file every path but /healthz, /readyz and the console's files wants
`Authorization: Bearer <token>` (401 otherwise); with --http-tls-cert/--http-tls-key it is HTTPS
(common.httpauth; the shared helpers are in common.web).
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from common.web import json_errors, json_response, secured_app, serve_app
from common.webconsole import add_console

from .protocol import SEPARATOR
from .subscriptions import SSE_SHUTDOWN

log = logging.getLogger("broker.http")

BROKER = web.AppKey("broker", object)
SSE_RETRY_MS = 2000  # the reconnect delay the stream asks EventSource clients for


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
        return json_response({"status": "unhealthy", "log_errors": errors, "failure": getattr(broker, "failure", None)}, status=503)
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[BROKER].draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready"})


def _events(span) -> bytes:
    """One SSE event per message, `id:` its offset (so a reconnect can resume after any message)."""
    messages = span.body.split(SEPARATOR)
    return b"".join([b"id: %d\ndata: %b\n\n" % event for event in zip(range(span.first_offset, span.first_offset + span.count), messages)])


def _missed(count: int | None, reason: str = "") -> bytes:
    return b"event: missed\ndata: " + orjson.dumps({"missed": count, **({"reason": reason} if reason else {})}) + b"\n\n"


def _resume_from(request: web.Request) -> int | None:
    """The offset after the client's Last-Event-ID header, or None (no header, or not an offset)."""
    value = request.headers.get("Last-Event-ID", "").strip()
    return int(value) + 1 if value.isdigit() else None


async def _catch_up(response: web.StreamResponse, topic, cursor: int) -> int:
    """Send what the topic still holds from `cursor` up to its end (the log or the in-memory
    window), with a `missed` event for whatever it no longer holds; returns the new cursor."""
    loop = asyncio.get_running_loop()
    while cursor < topic.next_offset:
        sent = False
        spans = topic.history(cursor)
        while (span := next(spans, None) if topic.log is None else await loop.run_in_executor(None, next, spans, None)) is not None:  # the log: off the loop
            if span.first_offset > cursor:  # retention removed these before we could send them
                await response.write(_missed(span.first_offset - cursor, "no longer held"))
            await response.write(_events(span))
            cursor, sent = span.first_offset + span.count, True
        if not sent:
            await response.write(_missed(topic.next_offset - cursor, "no longer held"))
            cursor = topic.next_offset
    return cursor


async def _stream(request: web.Request) -> web.StreamResponse:
    """Live messages as Server-Sent Events. A client that sends Last-Event-ID (browsers do, on
    reconnect) first gets everything after that offset the topic still holds, then the live
    stream, with no gap and no duplicate: the live subscription starts before the catch-up, and
    every span is trimmed against the offset sent last (`cursor`)."""
    broker = request.app[BROKER]
    name = request.match_info["topic"]
    topic = broker.topics.get(name)
    if topic is None:
        return json_response({"error": f"unknown topic {name!r}"}, status=404)
    if not broker.sse_allowed():  # --max-sse
        return json_response({"error": "too many streams; retry later"}, status=503)
    resume = _resume_from(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sub = broker.add_sse_subscriber(topic)
    try:
        await response.write(b"retry: %d\n: subscribed to %b\n\n" % (SSE_RETRY_MS, name.encode()))
        cursor = topic.next_offset  # the next offset owed to the client
        if resume is not None and resume > cursor:  # offsets went back: a broker without persistence restarted
            await response.write(_missed(None, f"offset {resume - 1} is past the topic's end ({cursor}); continuing live"))
        elif resume is not None:
            cursor = await _catch_up(response, topic, resume)
        resuming = resume is not None
        while (item := await sub.queue.get()) is not SSE_SHUTDOWN:
            span, _ = item
            end = span.first_offset + span.count
            if end <= cursor:
                continue  # already sent by the catch-up
            head = b""
            if span.first_offset > cursor:  # the live queue overflowed and dropped spans
                if resuming:  # not live yet (spans dropped between the catch-up and now): read them from the topic
                    cursor = await _catch_up(response, topic, cursor)
                    if end <= cursor:
                        continue
                else:  # live: the reader fell behind; say how much it missed (as before)
                    head = _missed(span.first_offset - cursor)
            resuming = False
            await response.write(head + _events(span.from_offset(cursor)))
            cursor = end
        await response.write(b"event: shutdown\ndata: {}\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client left, or the broker is closing
    finally:
        broker.remove_subscriber(topic, sub)
    return response


async def _metrics(request: web.Request) -> web.Response:
    from .metrics import CONTENT_TYPE

    return web.Response(body=request.app[BROKER].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def make_app(broker) -> web.Application:
    app = secured_app(broker.config.http_security, json_errors)
    app[BROKER] = broker
    app.router.add_get("/stats", _all_stats)
    app.router.add_get("/stats/{topic}", _topic_stats)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/topics/{topic}/stream", _stream)
    app.router.add_get("/metrics", _metrics)
    add_console(app)
    return app


async def start_http(broker, host: str, port: int, shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, str]:
    """Serve the broker's app on host:port (0 picks a free port); returns the runner and the base URL."""
    return await serve_app(make_app(broker), host, port, shutdown_timeout, security=broker.config.http_security)
