"""The streamer's own HTTP when it publishes to a separate broker (--broker-url): health and the
workers' metrics. (With the embedded broker, its HTTP serves these, with the broker's.)

    GET /          the web console (broker.webconsole), showing what /stats has

--http-token-file, --http-tls-cert/--http-tls-key protect it as they do the broker's (broker.httpauth).

    GET /healthz   200 while the streamer runs (also while it drains)
    GET /readyz    200 while streaming, 503 from the moment a drain begins
    GET /metrics   the workers' counters, Prometheus text format
    GET /stats     {"workers": {index: {pid, running, restarts, given_up, sent, published,
                   unacknowledged, lost_by_broker, skipped}}} (the same object as the embedded
                   broker's /stats shows)
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.config import HttpSecurity
from broker.http import json_response, secured_app, serve_app
from broker.webconsole import add_console

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SUPERVISOR = web.AppKey("supervisor", object)


class WorkerCollector:
    """The workers' counters as the supervisor knows them (each worker reports once a second)."""

    def __init__(self, supervisor):
        self.supervisor = supervisor

    def collect(self):
        sent = CounterMetricFamily("telemetry_worker_sent", "Messages a worker sent", labels=["worker"])
        published = CounterMetricFamily("telemetry_worker_published", "Messages the broker acknowledged to a worker", labels=["worker"])
        unacked = GaugeMetricFamily("telemetry_worker_unacknowledged", "Messages a worker holds unacknowledged", labels=["worker"])
        restarts = CounterMetricFamily("telemetry_worker_restarts", "Times a worker process was restarted", labels=["worker"])
        lost = CounterMetricFamily(
            "telemetry_worker_lost_by_broker", "Messages acknowledged to a worker that the broker later no longer had", labels=["worker"]
        )
        skipped = CounterMetricFamily("telemetry_worker_rows_skipped", "CSV rows a worker skipped, by reason", labels=["worker", "reason"])
        for slot in self.supervisor.slots:
            label = [str(slot.index)]
            sent.add_metric(label, slot.sent)
            published.add_metric(label, slot.published)
            unacked.add_metric(label, slot.status.get("unacked", 0))
            restarts.add_metric(label, slot.restarts)
            lost.add_metric(label, slot.lost_by_broker)
            for reason, count in slot.skipped.items():
                skipped.add_metric([*label, reason], count)
        yield from (sent, published, unacked, restarts, lost, skipped)


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[SUPERVISOR].draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready"})


async def _stats(request: web.Request) -> web.Response:
    return json_response({"workers": request.app[SUPERVISOR].worker_stats()})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[SUPERVISOR].registry), headers={"Content-Type": CONTENT_TYPE})


async def start_health(supervisor, host: str, port: int, security: HttpSecurity = HttpSecurity()) -> tuple[web.AppRunner, str]:
    """Serve on host:port; with `security`, the token on every path but the probes and the console's page, and HTTPS."""
    app = secured_app(security)
    app[SUPERVISOR] = supervisor
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/stats", _stats)
    add_console(app)
    return await serve_app(app, host, port, security=security)


def new_registry(supervisor) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(supervisor))
    return registry
