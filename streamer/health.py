"""The streamer's own HTTP when it publishes to a separate broker (--broker-url): health and the
workers' metrics. (With the embedded broker, its HTTP serves these, with the broker's.)

    GET /          the web console (common.webconsole), showing what /stats has

--http-token-file, --http-tls-cert/--http-tls-key protect it as they do the broker's (common.httpauth).

    GET /healthz   200 while the streamer runs (also while it drains)
    GET /readyz    200 while streaming, 503 from the moment a drain begins
    GET /metrics   the workers' counters, Prometheus text format
    GET /stats     {"workers": {index: {pid, running, restarts, given_up, sent, published,
                   unacknowledged, lost_by_broker, skipped}}} (the same object as the embedded
                   broker's /stats shows); with NATS also "jetstream": the stream's state
    GET /stats/<topic>   with NATS: the streamer's counters summed over workers (sent, published,
                   unacknowledged, rejected, skipped by reason), "workers", and the stream's state
                   read from JetStream: {"stream", "messages", "bytes", "first_seq", "last_seq",
                   "consumer_count", "replicas", "storage", "cluster": {"name", "leader",
                   "replicas": [{"name", "current", "active_s", "lag"}]}}; "messages" and "bytes"
                   are also at the top level, as in the broker's /stats/<topic>

Every error (an unknown path, a wrong method) is a JSON object {"error": ...}, as the broker's.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.config import HttpSecurity
from common.web import json_errors, json_response, secured_app, serve_app
from common.webconsole import add_console

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SUPERVISOR = web.AppKey("supervisor", object)


class WorkerCollector:
    """The workers' counters as the supervisor knows them (live: the workers write them into memory shared with it)."""

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
            unacked.add_metric(label, slot.live("unacked"))
            restarts.add_metric(label, slot.restarts)
            lost.add_metric(label, slot.lost_by_broker)
            for reason, count in slot.skipped.items():
                skipped.add_metric([*label, reason], count)
        yield from (sent, published, unacked, restarts, lost, skipped)


class StreamCollector:
    """The NATS stream's state as last read (the supervisor's StreamMonitor refreshes it)."""

    def __init__(self, monitor):
        self.monitor = monitor

    def collect(self):
        state = self.monitor.state
        if not state:
            return
        label = [state["stream"]]
        families = [
            GaugeMetricFamily("telemetry_nats_stream_messages", "Messages in the JetStream stream", labels=["stream"]),
            GaugeMetricFamily("telemetry_nats_stream_bytes", "Bytes in the JetStream stream", labels=["stream"]),
            GaugeMetricFamily("telemetry_nats_stream_last_seq", "Last sequence number in the JetStream stream", labels=["stream"]),
            GaugeMetricFamily("telemetry_nats_stream_consumers", "Consumers of the JetStream stream", labels=["stream"]),
            GaugeMetricFamily("telemetry_nats_stream_current_replicas", "Stream replicas that are current, the leader included", labels=["stream"]),
        ]
        cluster = state.get("cluster") or {}
        current = (1 if cluster.get("leader") or not cluster else 0) + sum(1 for r in cluster.get("replicas") or [] if r["current"])
        for family, value in zip(families, (state["messages"], state["bytes"], state["last_seq"], state["consumer_count"], current)):
            family.add_metric(label, value)
        yield from families


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[SUPERVISOR].draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready"})


async def _stats(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    body = {"workers": supervisor.worker_stats()}
    if supervisor.stream_monitor is not None:
        body["jetstream"] = await supervisor.stream_monitor.refresh()
    return json_response(body)


async def _topic_stats(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    topic = request.match_info["topic"]
    if supervisor.stream_monitor is None or topic != supervisor.cfg.worker.topic:
        return json_response({"error": f"unknown topic {topic!r}"}, status=404)
    monitor = supervisor.stream_monitor
    stream = await monitor.refresh()
    workers = supervisor.worker_stats()
    skipped: dict[str, int] = {}
    for w in workers.values():
        for reason, count in w["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    body = {
        "topic": topic,
        "destination": "nats",
        "messages": stream["messages"] if stream else None,
        "bytes": stream["bytes"] if stream else None,
        "sent": sum(w["sent"] for w in workers.values()),
        "published": sum(w["published"] for w in workers.values()),
        "unacknowledged": sum(w["unacknowledged"] for w in workers.values()),
        "rejected": sum(slot.status.get("rejected", 0) for slot in supervisor.slots),
        "skipped": skipped,
        "workers": workers,
        "jetstream": stream,
        "jetstream_error": monitor.error,
    }
    return json_response(body)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[SUPERVISOR].registry), headers={"Content-Type": CONTENT_TYPE})


async def start_health(supervisor, host: str, port: int, security: HttpSecurity = HttpSecurity()) -> tuple[web.AppRunner, str]:
    """Serve on host:port; with `security`, the token on every path but the probes and the console's page, and HTTPS."""
    app = secured_app(security, json_errors)
    app[SUPERVISOR] = supervisor
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/stats/{topic}", _topic_stats)
    add_console(app)
    return await serve_app(app, host, port, security=security)


def new_registry(supervisor) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(supervisor))
    return registry
