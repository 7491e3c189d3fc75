"""Prometheus metrics (prometheus-client): the broker's state, read at scrape time.

A custom collector reads the same objects as /stats, so the two always agree; latencies are
histograms fed where they happen (fsync in broker.storage).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BrokerCollector:
    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        topics = list(self.broker.topics.values())
        accepted = CounterMetricFamily("telemetry_messages_accepted", "Messages accepted per topic", labels=["topic"])
        accepted_bytes = CounterMetricFamily("telemetry_bytes_accepted", "Message bytes accepted per topic", labels=["topic"])
        duplicates = CounterMetricFamily("telemetry_duplicates", "Messages received again and not stored twice", labels=["topic"])
        acks = CounterMetricFamily("telemetry_acknowledgments", "Batch acknowledgments sent to producers", labels=["topic"])
        skipped = CounterMetricFamily("telemetry_rows_skipped", "CSV rows the producers skipped, by reason (latest reports)", labels=["topic", "reason"])
        sub_dropped = CounterMetricFamily("telemetry_subscriber_dropped", "Messages dropped for slow subscribers", labels=["topic"])
        lag = GaugeMetricFamily("telemetry_group_lag", "Messages not yet acknowledged by a consumer group", labels=["topic", "group"])
        dead = CounterMetricFamily("telemetry_group_dead_lettered", "Messages sent to the dead-letter topic", labels=["topic", "group"])
        log_bytes = GaugeMetricFamily("telemetry_log_bytes", "Bytes of the topic's log on disk", labels=["topic"])
        log_segments = GaugeMetricFamily("telemetry_log_segments", "Segments of the topic's log", labels=["topic"])
        dropped = GaugeMetricFamily("telemetry_log_recovery_dropped_bytes", "Bytes truncated at the last recovery", labels=["topic"])
        for topic in topics:
            accepted.add_metric([topic.name], topic.messages)
            accepted_bytes.add_metric([topic.name], topic.bytes)
            duplicates.add_metric([topic.name], topic.duplicates)
            acks.add_metric([topic.name], topic.acks)
            for reason, count in topic.skipped().items():
                skipped.add_metric([topic.name, reason], count)
            sub_dropped.add_metric([topic.name], sum(s.dropped for s in topic.subscriptions.values()))
            for group in topic.groups.values():
                lag.add_metric([topic.name, group.name], topic.next_offset - group.committed)
                dead.add_metric([topic.name, group.name], group.dead_lettered)
            if topic.log is not None:
                stats = topic.log.stats()
                log_bytes.add_metric([topic.name], stats["bytes"])
                log_segments.add_metric([topic.name], stats["segments"])
                dropped.add_metric([topic.name], stats["recovery_dropped_bytes"])
        bad = CounterMetricFamily("telemetry_bad_frames", "Frames ignored because they are not the protocol", labels=["reason"])
        for reason, count in self.broker.bad_frames.items():
            bad.add_metric([reason], count)
        refused = CounterMetricFamily(
            "telemetry_connections_refused", "ZeroMQ connections refused by CURVE (unknown_key, no_curve, bad_handshake)", labels=["reason"]
        )
        for reason, count in self.broker.transport.refused.items():
            refused.add_metric([reason], count)
        yield from (accepted, accepted_bytes, duplicates, acks, skipped, sub_dropped, lag, dead, log_bytes, log_segments, dropped, bad, refused)


class Metrics:
    """One registry per broker (so tests may run several in one process)."""

    def __init__(self, broker):
        self.registry = CollectorRegistry()
        self.registry.register(BrokerCollector(broker))
        self.fsync_seconds = Histogram(
            "telemetry_fsync_seconds",
            "Time an fsync of a log took",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.burst_seconds = Histogram(
            "telemetry_ack_latency_seconds",
            "From a burst of batches received to its acknowledgments sent (incl. fsync)",
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
