"""Consumer groups at work (their state is broker.groups): joining (CONSUME), handing messages
out round-robin to members with credit, acknowledgments (GROUP_ACK), leaving, the redelivery
timer (`expire_deliveries`: a message not acknowledged within --ack-timeout goes back to its
group) and dead letters (after --max-deliveries, to the topic `<topic>.dlq`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import orjson

from common.names import valid_topic

from . import protocol as p
from .config import BrokerConfig
from .groups import FOREIGN, Delivery, Group, GroupMember
from .registry import TopicLimit, TopicRegistry, in_thread
from .segmentlog import LogUnavailable
from .topic import ProducerLimit, Span, Topic
from .transport import ZMQ_GONE, ZMQ_SENT, Transport

log = logging.getLogger("broker")


class GroupCoordinator:
    def __init__(self, config: BrokerConfig, registry: TopicRegistry, transport: Transport, on_durable: Callable[[Topic, Span], None]):
        self.ack_timeout_s = config.ack_timeout_s
        self.max_deliveries = config.max_deliveries
        self.max_credit = config.subscriber_queue * 10  # unacknowledged messages one member may hold (1,000 by default)
        self.max_groups = config.limits.max_groups
        self.max_members = config.limits.max_subscribers
        self._loads: set[asyncio.Task] = set()  # batches being read ahead from logs
        self.registry = registry
        self.transport = transport
        self.on_durable = on_durable  # a dead letter reaches the .dlq topic's subscriptions and groups
        self._dlq_producer = os.urandom(p.PRODUCER_ID_BYTES)  # the broker's own id for dead letters (its sequence is per .dlq topic)
        self._armed = asyncio.Event()  # set when a delivery goes out: the redelivery timer has something to wait for

    def group(self, topic: Topic, name: str, create: bool = True) -> Group | None:
        """The group `name` (a valid name) of `topic`; a new one starts at the oldest message the topic holds."""
        group = topic.groups.get(name)
        if group is None and create:
            state_dir = os.path.join(topic.log.directory, "groups") if topic.log is not None else None
            group = topic.groups[name] = Group.load(name, state_dir, topic.first_offset)
            log.info("Broker: group %r of topic %r starts at offset %d", name, topic.name, group.committed)
        return group

    def consume(self, identity: bytes, topic: Topic, name: str, credit: int) -> str | None:
        """A CONSUME: join (or refresh). Returns why it was refused (--max-groups, --max-subscribers), else None."""
        if name not in topic.groups and len(topic.groups) >= self.max_groups:
            return "too many groups"
        group = self.group(topic, name)
        member = group.members.get(identity)
        if member is None:
            if len(group.members) >= self.max_members:
                return "too many members"
            member = group.members[identity] = GroupMember(identity, 0)
        member.credit = max(1, min(credit, self.max_credit))
        self.dispatch(topic, group)
        return None

    def acknowledge(self, identity: bytes, topic: Topic, name: str, offsets: bytes) -> int | None:
        """A GROUP_ACK from the connection `identity`; None if the group is unknown, else how many
        of the offsets were delivered to another connection (those are counted and ignored)."""
        group = self.group(topic, name, create=False)
        if group is None:
            return None
        foreign = 0
        for (offset,) in p.OFFSET.iter_unpack(offsets):
            if group.acknowledge(offset, identity) == FOREIGN:
                foreign += 1
        group.foreign_acks += foreign
        group.save(background=in_thread)
        self.dispatch(topic, group)
        return foreign

    def leave(self, identity: bytes, topic: Topic, name: str) -> None:
        group = self.group(topic, name, create=False)
        if group is not None:
            group.remove_member(identity)
            self.dispatch(topic, group)

    def dispatch_all(self, topic: Topic) -> None:
        """New messages in `topic`: every group hands out what its members have room for."""
        for group in topic.groups.values():
            self.dispatch(topic, group)

    def dispatch(self, topic: Topic, group: Group) -> None:
        """Hand out messages while a member has room: redeliveries first, then new ones."""
        now = time.monotonic()
        names = topic.name.encode(), group.name.encode()
        while (member := group.next_member()) is not None:
            if group.retry:
                delivery = group.retry.popleft()
            elif group.ahead is not None or self._read_ahead(topic, group):
                delivery = group.take_ahead()
            else:
                return
            delivery.deliveries += 1
            sent = self.transport.send(
                member.identity,
                p.message_frames(*names, delivery.offset, delivery.deliveries, delivery.producer, delivery.seq, delivery.received_ns, delivery.payload),
            )
            if sent != ZMQ_SENT:
                delivery.deliveries -= 1
                group.retry.appendleft(delivery)
                if sent == ZMQ_GONE:
                    group.remove_member(member.identity)
                    continue
                return
            delivery.member, delivery.deadline = member.identity, now + self.ack_timeout_s
            group.inflight[delivery.offset] = delivery
            self._armed.set()
            member.holding += 1
            group.delivered += 1
            if delivery.deliveries > 1:
                group.redelivered += 1

    def _read_ahead(self, topic: Topic, group: Group) -> bool:
        """Hold the next stored batch the group has not handed out yet (its messages are taken one
        at a time, as members have credit); False if there is none now. A persisted log is read
        off the event loop: False meanwhile, and the group is dispatched again once it is read."""
        if group.next_offset >= topic.next_offset or group.loading:
            return False
        if topic.log is None:
            return self._hold(group, next(topic.history(group.next_offset), None))
        group.loading = True
        task = asyncio.get_running_loop().create_task(self._load(topic, group))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return False

    async def _until_first_deadline(self) -> None:
        """Sleep until the earliest in-flight delivery is due; with none in flight, until one goes out."""
        deadlines = [d.deadline for t in self.registry.topics.values() for g in t.groups.values() for d in g.inflight.values()]
        if not deadlines:
            self._armed.clear()
            await self._armed.wait()
            return
        await asyncio.sleep(max(0.001, min(deadlines) - time.monotonic()))

    async def _load(self, topic: Topic, group: Group) -> None:
        offset = group.next_offset
        try:
            span = await asyncio.get_running_loop().run_in_executor(None, lambda: next(topic.history(offset), None))
        except Exception:  # the next dispatch tries again
            log.exception("Broker: group %r of %r cannot read offset %d from the log", group.name, topic.name, offset)
            return
        finally:
            group.loading = False
        if group.next_offset == offset and topic.groups.get(group.name) is group and self._hold(group, span):
            self.dispatch(topic, group)

    @staticmethod
    def _hold(group: Group, span: Span | None) -> bool:
        if span is None:
            return False
        if span.first_offset > group.next_offset:  # retention removed what the group never read
            if group.committed == group.next_offset and not group.inflight:
                group.committed = span.first_offset
            group.next_offset = span.first_offset
        group.ahead, group.ahead_at = span, 0
        return True

    async def expire_deliveries(self) -> None:
        """The redelivery timer: messages not acknowledged in time go back to their group, or to the dead-letter topic."""
        while True:
            await self._until_first_deadline()
            now = time.monotonic()
            for topic in list(self.registry.topics.values()):
                for group in list(topic.groups.values()):
                    expired = [d for d in group.inflight.values() if d.deadline <= now]
                    for delivery in expired:
                        group.take_back(delivery)
                        if delivery.deliveries >= self.max_deliveries:
                            self._dead_letter(topic, group, delivery)
                        else:
                            group.retry.append(delivery)
                    if expired:
                        group.save(background=in_thread)
                        self.dispatch(topic, group)

    def _dead_letter(self, topic: Topic, group: Group, delivery: Delivery) -> None:
        reason = f"not acknowledged within {self.ack_timeout_s:g} s, {delivery.deliveries} deliveries"
        head = orjson.dumps({"topic": topic.name, "group": group.name, "offset": delivery.offset, "deliveries": delivery.deliveries, "reason": reason})
        body = head[:-1] + b',"message":' + delivery.payload + b"}"  # the original bytes, unchanged
        dlq_name = f"{topic.name}.dlq"
        try:
            dlq = self.registry.get(dlq_name) if valid_topic(dlq_name) else None
            if dlq is None:
                raise LogUnavailable("the topic name is too long for a .dlq topic")
            producer = dlq.producers.get(self._dlq_producer)
            span = dlq.append(self._dlq_producer, producer.next_seq if producer is not None else 0, 1, body)
        except (LogUnavailable, TopicLimit, ProducerLimit) as exc:
            exc = exc if isinstance(exc, LogUnavailable) else "--max-topics reached" if isinstance(exc, TopicLimit) else "--max-producers reached"
            log.error("Broker: cannot dead-letter offset %d of %r (%s); it stays with group %r", delivery.offset, topic.name, exc, group.name)
            group.retry.append(delivery)
            return
        group.dead_lettered += 1
        group.done(delivery.offset)
        if dlq.log is not None and dlq.log.fsync != "never":
            try:
                dlq.log.sync()
            except LogUnavailable:
                pass
        self.on_durable(dlq, span)

    def close_all(self, topics: dict[str, Topic]) -> None:
        """The broker is going away: tell every member (CLOSING); what they hold is delivered again after a restart."""
        for task in self._loads:
            task.cancel()
        for topic in topics.values():
            for group in topic.groups.values():
                for identity in group.members:
                    self.transport.send(identity, p.closing_frames(topic.name.encode(), group.name.encode()))
