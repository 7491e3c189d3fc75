"""Consumer groups: acknowledged, at-least-once consumption of a topic, shared by the group's consumers.

A group reads the topic from its committed offset: every offset below it is acknowledged. It
hands each message to one consumer with credit (credit = how many unacknowledged messages that
consumer may hold), round-robin, so consumers of one group share the work. A message not
acknowledged within the ack timeout goes back to the group and is delivered again, up to the
max deliveries; then it goes to the dead-letter topic `<topic>.dlq`, wrapped with the reason,
and counts as done. The committed offset is kept in `<persistence-dir>/<topic>/groups/<group>`
when persistence is on (written atomically, at most every COMMIT_INTERVAL_S and at close), so a
group that comes back after a crash continues from it; messages delivered but not acknowledged
then are delivered again (at-least-once).

A new group starts at the oldest message the topic still holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import orjson

from .safefs import make_private_dir, open_read, write_private

log = logging.getLogger("broker.groups")

COMMIT_INTERVAL_S = 0.2
UNKNOWN, ACKED, FOREIGN = range(3)  # what an acknowledgment did (Group.acknowledge)


@dataclass(slots=True)
class Delivery:
    """One message of the group: waiting to be handed out, in flight with a member, or waiting for redelivery."""

    offset: int
    payload: bytes
    producer: bytes
    seq: int
    received_ns: int
    deliveries: int = 0
    member: bytes = b""  # the identity of the member holding it, while in flight
    deadline: float = 0.0


@dataclass(slots=True)
class GroupMember:
    """A consumer of the group as the broker sees it: its connection's identity and its room
    (the client-side counterpart is broker.client.Consumer)."""

    identity: bytes
    credit: int  # unacknowledged messages it may hold
    holding: int = 0


@dataclass
class Group:
    name: str
    committed: int  # every offset below is acknowledged
    next_offset: int  # the first offset never handed out
    state_path: str | None = None
    members: dict[bytes, GroupMember] = field(default_factory=dict)
    inflight: dict[int, Delivery] = field(default_factory=dict)
    retry: deque[Delivery] = field(default_factory=deque)  # timed out, waiting for a consumer
    ahead: object = None  # the stored batch (a topic Span) `next_offset` is in, handed out one message at a time
    ahead_at: int = 0  # where the message at `next_offset` starts in ahead.body
    loading: bool = False  # the next batch is being read from the log (off the event loop)
    acked_above: set[int] = field(default_factory=set)  # acknowledged offsets above `committed`
    delivered: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    foreign_acks: int = 0  # acknowledgments of messages delivered to another connection (ignored)
    _rr: int = 0
    _saved: int = -1
    _saved_at: float = 0.0
    _saving: bool = False

    @classmethod
    def load(cls, name: str, state_dir: str | None, start: int) -> Group:
        path = os.path.join(state_dir, name) if state_dir else None
        committed = start
        if path is not None:
            try:
                with open_read(path) as f:
                    committed = max(start, int(orjson.loads(f.read(4096))["committed"]))
            except FileNotFoundError:
                pass
            except OSError as exc:  # e.g. a symbolic link: refused, not followed
                log.warning("Group %s: cannot read its committed offset in %s (%s); starting at %d", name, path, exc.strerror or exc, start)
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                log.warning("Group %s: unreadable committed offset in %s; starting at %d", name, path, start)
        return cls(name, committed, committed, path)

    def next_member(self) -> GroupMember | None:
        """A member with room, round-robin."""
        members = list(self.members.values())
        for i in range(len(members)):
            member = members[(self._rr + i) % len(members)]
            if member.holding < member.credit:
                self._rr = (self._rr + i + 1) % len(members)
                return member
        return None

    def take_ahead(self) -> Delivery | None:
        """The message at `next_offset` from the batch read ahead (None when it is used up)."""
        span = self.ahead
        if span is None:
            return None
        index = self.next_offset - span.first_offset
        start = self.ahead_at
        end = span.body.find(b"\n", start)
        payload = span.body[start:] if end < 0 else span.body[start:end]
        self.ahead_at = end + 1
        self.next_offset += 1
        if index + 1 >= span.count:
            self.ahead, self.ahead_at = None, 0
        return Delivery(span.first_offset + index, payload, span.producer, span.first_seq + index, span.received_ns)

    def acknowledge(self, offset: int, identity: bytes) -> int:
        """An acknowledgment from the connection `identity` counts for a message in flight with it
        and for one waiting for redelivery that was delivered to it last (its ack timed out, or it
        left, while the acknowledgment was on its way). Returns ACKED, FOREIGN (delivered to
        someone else: ignored) or UNKNOWN (late: dead-lettered or acknowledged already)."""
        if offset < self.committed or offset >= self.next_offset or offset in self.acked_above:
            return UNKNOWN  # never handed out, or done already: no search
        delivery = self.inflight.get(offset)
        if delivery is not None:
            if delivery.member != identity:
                return FOREIGN
            self.take_back(delivery)
        else:
            delivery = self._take_from_retry(offset, identity)
            if delivery is None:
                return UNKNOWN
            if delivery is FOREIGN:
                return FOREIGN
        self.done(offset)
        return ACKED

    def take_back(self, delivery: Delivery) -> None:
        """The delivery is no longer in flight with its member."""
        del self.inflight[delivery.offset]
        member = self.members.get(delivery.member)
        if member is not None:
            member.holding -= 1

    def _take_from_retry(self, offset: int, identity: bytes):
        for delivery in self.retry:
            if delivery.offset == offset:
                if delivery.member != identity:
                    return FOREIGN
                self.retry.remove(delivery)
                return delivery
        return None

    def done(self, offset: int) -> None:
        """The message at `offset` needs no more delivery: advance the committed offset."""
        if offset == self.committed:
            self.committed += 1
            while self.committed in self.acked_above:
                self.acked_above.discard(self.committed)
                self.committed += 1
        elif offset > self.committed:
            self.acked_above.add(offset)

    def remove_member(self, identity: bytes) -> None:
        """A member left: what it held goes back to the group at once."""
        if self.members.pop(identity, None) is None:
            return
        for delivery in [d for d in self.inflight.values() if d.member == identity]:
            del self.inflight[delivery.offset]
            self.retry.append(delivery)

    def save(self, force: bool = False, background=None) -> None:
        """Write the committed offset (at most every COMMIT_INTERVAL_S unless `force`); with
        `background` (a callable running work off the event loop) the write and its fsync run there."""
        if self.state_path is None or self.committed == self._saved or (self._saving and not force):
            return
        now = time.monotonic()
        if not force and now - self._saved_at < COMMIT_INTERVAL_S:
            return
        committed = self.committed
        if background is None:
            self._write(committed, now)
            return
        self._saving = True

        def work() -> None:
            try:
                self._write(committed, now)
            finally:
                self._saving = False

        background(work)

    def _write(self, committed: int, now: float) -> None:
        tmp = f"{self.state_path}.{threading.get_ident()}.tmp"  # a write at close may overlap one in the background
        try:
            make_private_dir(os.path.dirname(self.state_path))
            write_private(tmp, orjson.dumps({"committed": committed}))
            os.replace(tmp, self.state_path)  # replaces a link itself, never what it points to
        except OSError as exc:
            log.error("Group %s: cannot save its committed offset to %s: %s", self.name, self.state_path, exc.strerror or exc)
            return
        if committed >= self._saved:
            self._saved, self._saved_at = committed, now

    def stats(self, topic_next_offset: int) -> dict:
        return {
            "committed": self.committed,
            "lag": topic_next_offset - self.committed,
            "in_flight": len(self.inflight),
            "consumers": len(self.members),
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "dead_lettered": self.dead_lettered,
            "foreign_acks": self.foreign_acks,
        }
