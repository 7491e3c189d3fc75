"""Every frame a peer sends is checked here, field by field, before anything uses it; a valid one
goes to its handler by frame type, an invalid one is counted by reason (`bad_frames`, in /stats)
and logged at a bounded rate. The frame layouts are in broker.protocol.

    PUBLISH      -> Ingest.publish           (or a NACK "I" with the reason, for a bad batch)
    REPORT       -> the producer's latest report, kept on its topic
    SUBSCRIBE, CREDIT, UNSUBSCRIBE -> Subscriptions
    CONSUME, GROUP_ACK, LEAVE      -> GroupCoordinator

Checks: the frame count and each fixed-size field's length; topic and group names (ASCII, the one
rule of common.names); a batch's count (>= 1, equal to the messages in its body) and sequence
range (the next expected one, first seq + count, fits in u64); message sizes; a subscription's
start kind; an acknowledgment's number of offsets (1 to MAX_ACK_OFFSETS); a report's producer id,
size (--max-report-bytes) and schema (common.reports).

Only a PUBLISH creates a topic (below --max-topics, else NACK "U"); any other frame naming a
topic the broker does not hold is refused (`unknown_topic`; SUBSCRIBE, CONSUME and GROUP_ACK
get an ERROR frame, see broker.protocol).
"""

from __future__ import annotations

import logging
from collections import Counter

import orjson

from common.names import valid_group, valid_topic
from common.reports import check_report

from . import protocol as p
from .config import BrokerConfig
from .group_coordinator import GroupCoordinator
from .ingest import Ingest
from .registry import TopicLimit, TopicRegistry
from .subscriptions import Subscriptions
from .throttle import LogThrottle
from .topic import Topic

log = logging.getLogger("broker")

MAX_SILENT_REPORTS = 1024  # per topic: reports of producers that have not published

MAX_SEQ = 2**64 - 1


def _name(raw: bytes, valid) -> str | None:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name if valid(name) else None


class FrameDispatcher:
    def __init__(
        self,
        config: BrokerConfig,
        registry: TopicRegistry,
        ingest: Ingest,
        subscriptions: Subscriptions,
        groups: GroupCoordinator,
        throttle: LogThrottle,
    ):
        self.max_message_bytes = config.max_message_bytes
        self.max_report_bytes = config.limits.max_report_bytes
        self.registry = registry
        self.ingest = ingest
        self.subscriptions = subscriptions
        self.groups = groups
        self.bad_frames: Counter = Counter()  # frames that are not the protocol, by reason
        self._throttle = throttle
        self._by_raw_name: dict[bytes, Topic] = {}  # topics are never removed, so this never goes stale
        self._handlers = {
            p.PUBLISH: (6, self._publish),
            p.REPORT: (6, self._report),
            p.SUBSCRIBE: (5, self._subscribe),
            p.CREDIT: (5, self._credit),
            p.UNSUBSCRIBE: (4, self._unsubscribe),
            p.CONSUME: (6, self._consume),
            p.GROUP_ACK: (6, self._group_ack),
            p.LEAVE: (5, self._leave),
        }

    def handle(self, frames: list[bytes]) -> None:
        """One multipart message from a peer: [identity, signature, command, ...]."""
        try:
            self._handle(frames)
        except Exception:  # a bug must not stop the broker serving everyone else
            log.exception("Broker: error while handling a frame; frame ignored")
            self.bad_frame("internal_error")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[1] != p.SIGNATURE:
            self.bad_frame("not_protocol")
            return
        expected, handler = self._handlers.get(frames[2], (0, None))
        if handler is None or len(frames) != expected:
            self.bad_frame("unknown_command")
            return
        handler(frames)

    def bad_frame(self, reason: str) -> None:
        self.bad_frames[reason] += 1
        if self._throttle.may_log(f"frame:{reason}"):
            log.warning("Broker: ignored a bad frame (%s); %d so far", reason, self.bad_frames[reason])

    def _topic(self, raw: bytes, create: bool = False) -> Topic | None:
        """The topic a frame names (created only if `create`: for a PUBLISH); None for an invalid
        or unknown name. A name seen before is found by its bytes: no decoding or name check per
        batch. Raises TopicLimit when a topic would be created beyond --max-topics."""
        topic = self._by_raw_name.get(raw)
        if topic is None:
            name = _name(raw, valid_topic)
            if name is None:
                return None
            topic = self.registry.get(name) if create else self.registry.topics.get(name)
            if topic is not None:
                self._by_raw_name[raw] = topic
        return topic

    def _known_topic(self, identity: bytes, command: bytes, raw: bytes, refuse: bool = True) -> Topic | None:
        """The existing topic a non-PUBLISH frame names; else the frame is counted (and, if
        `refuse`, answered with an ERROR) and None returned."""
        topic = self._topic(raw)
        if topic is None:
            self.bad_frame("unknown_topic" if _name(raw, valid_topic) is not None else "bad_topic")
            if refuse:
                self._refuse(identity, command, raw, "unknown topic")
        return topic

    def _refuse(self, identity: bytes, command: bytes, topic_name: bytes, reason: str) -> None:
        self.ingest.transport.send(identity, p.error_frames(command, topic_name[:256], reason))

    # -- producers -----------------------------------------------------------------------------

    def _publish(self, frames: list[bytes]) -> None:
        identity, _, _, topic_name, header, body = frames
        if len(header) != p.PUB_HEADER.size:
            self.bad_frame("bad_header")
            return
        producer_id, first_seq, count = p.PUB_HEADER.unpack(header)
        try:
            topic = self._topic(topic_name, create=True)
        except TopicLimit:
            self.bad_frame("topic_limit")
            self.ingest.refuse(identity, None, producer_id, first_seq, count, p.NACK_UNAVAILABLE, "topic limit reached")
            return
        reason = None
        if topic is None:
            reason = "bad_topic"
        elif count < 1 or p.message_count(body) != count:
            reason = "count_mismatch"
        elif first_seq > MAX_SEQ - count:
            reason = "bad_sequence"  # the next expected sequence number would not fit in u64
        elif len(body) > self.max_message_bytes and max(map(len, body.split(p.SEPARATOR))) > self.max_message_bytes:
            reason = "message_too_large"
        if reason is None:
            self.ingest.publish(identity, topic, producer_id, first_seq, count, body)
            return
        if topic is not None:
            topic.rejected[reason] += count
        self.bad_frame(reason)
        self.ingest.refuse(identity, topic, producer_id, first_seq, count, p.NACK_INVALID, reason)

    def _report(self, frames: list[bytes]) -> None:
        identity, _, _, topic_name, producer_id, report = frames
        if len(report) > self.max_report_bytes:
            self.bad_frame("report_too_large")
            return
        if len(producer_id) != p.PRODUCER_ID_BYTES:
            self.bad_frame("bad_report")
            return
        topic = self._known_topic(identity, p.REPORT, topic_name, refuse=False)
        if topic is None:
            return
        try:
            value = orjson.loads(report)
        except orjson.JSONDecodeError:
            value = None
        if check_report(value) is not None:
            self.bad_frame("bad_report")
            return
        producer = topic.producers.get(producer_id)
        if producer is not None:
            producer.report = value
            topic.silent_reports.pop(producer_id, None)
        else:  # it has not published (every row skipped, so far): its report still counts
            if producer_id not in topic.silent_reports and len(topic.silent_reports) >= MAX_SILENT_REPORTS:
                del topic.silent_reports[next(iter(topic.silent_reports))]
            topic.silent_reports[producer_id] = value

    # -- subscribers ---------------------------------------------------------------------------

    def _subscribe(self, frames: list[bytes]) -> None:
        identity, _, _, topic_name, header = frames
        if len(header) != p.SUB_HEADER.size:
            self.bad_frame("unknown_command")
            return
        start, value, credit = p.SUB_HEADER.unpack(header)
        if start > p.FROM_TIME:
            self.bad_frame("bad_subscribe")
            return
        topic = self._known_topic(identity, p.SUBSCRIBE, topic_name)
        if topic is None:
            return
        refused = self.subscriptions.subscribe(identity, topic, start, value, credit)
        if refused is not None:
            self.bad_frame("subscriber_limit")
            self._refuse(identity, p.SUBSCRIBE, topic_name, refused)

    def _credit(self, frames: list[bytes]) -> None:
        identity, _, _, topic_name, body = frames
        if len(body) != p.CREDIT_BODY.size:
            self.bad_frame("unknown_command")
            return
        topic = self._known_topic(identity, p.CREDIT, topic_name, refuse=False)
        if topic is not None:
            self.subscriptions.credit(identity, topic, p.CREDIT_BODY.unpack(body)[0])

    def _unsubscribe(self, frames: list[bytes]) -> None:
        identity, _, _, topic_name = frames
        topic = self._known_topic(identity, p.UNSUBSCRIBE, topic_name, refuse=False)
        if topic is not None:
            self.subscriptions.unsubscribe(topic, identity)

    # -- consumer groups -----------------------------------------------------------------------

    def _group_frame(self, frames: list[bytes], reason: str, refuse: bool = True) -> tuple[Topic, str] | None:
        group = _name(frames[4], valid_group)
        if group is None:
            self.bad_frame(reason)
            return None
        topic = self._known_topic(frames[0], frames[2], frames[3], refuse)
        return None if topic is None else (topic, group)

    def _consume(self, frames: list[bytes]) -> None:
        if len(frames[5]) != p.CREDIT_BODY.size:
            self.bad_frame("unknown_command")
            return
        found = self._group_frame(frames, "bad_consume")
        if found is not None:
            refused = self.groups.consume(frames[0], *found, p.CREDIT_BODY.unpack(frames[5])[0])
            if refused is not None:
                self.bad_frame("group_limit")
                self._refuse(frames[0], p.CONSUME, frames[3], refused)

    def _group_ack(self, frames: list[bytes]) -> None:
        size = len(frames[5])
        if size % p.OFFSET.size or not 0 < size <= p.MAX_ACK_OFFSETS * p.OFFSET.size:
            self.bad_frame("bad_group_ack")
            return
        found = self._group_frame(frames, "bad_group_ack")
        if found is None:
            return
        foreign = self.groups.acknowledge(frames[0], *found, frames[5])
        if foreign is None:
            self.bad_frame("bad_group_ack")
            self._refuse(frames[0], p.GROUP_ACK, frames[3], "unknown group")
        elif foreign:
            self.bad_frame("foreign_ack")

    def _leave(self, frames: list[bytes]) -> None:
        found = self._group_frame(frames, "bad_leave", refuse=False)
        if found is not None:
            self.groups.leave(frames[0], *found)
