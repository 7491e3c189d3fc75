"""The wire protocol between producers and the broker, version 1 ("TLM1").

Transport: ZeroMQ. The broker binds a ROUTER socket; producers connect DEALER sockets. Every
message is multipart; frame 0 is the signature, frame 1 the command. Integers are big-endian.

Producer -> broker

    PUBLISH  | "TLM1" | "P" | topic (UTF-8) | PUB_HEADER | body
             PUB_HEADER (28 B) = producer id (16 B) | first seq (u64) | count (u32)
             first seq + count must fit in u64 (it is the next expected number): else NACK "I" bad_sequence
             body = `count` messages joined by b"\\n"; each message is one compact JSON object
             (so it holds no raw newline), at most --max-message-bytes long.
             The whole multipart message is at most max(MAX_FRAME_BYTES, --max-message-bytes +
             64 KiB); ZeroMQ closes the connection of a peer that sends more, before the broker
             allocates it (publishers split larger batches, see `batch_bytes`).
    REPORT   | "TLM1" | "R" | topic | producer id (16 B) | JSON object      (no reply)
             the producer's own cumulative counters, e.g. {"name": "worker-0@host",
             "skipped": {"field_count": 2}}; the broker keeps the latest per producer that has
             published to the topic. Checked against common.reports (known skip reasons, integer
             counts >= 0) and at most --max-report-bytes; a bad one is counted and ignored.

Only a PUBLISH creates a topic, and only while fewer than --max-topics exist (else NACK "U").
A new producer beyond --max-producers of the topic: NACK "U" (an idle one expires after
--producer-expiry, and with it its de-duplication state).

Subscriber -> broker

    SUBSCRIBE    | "TLM1" | "S" | topic | SUB_HEADER
                 SUB_HEADER (13 B) = start (u8: FROM_LIVE, FROM_BEGINNING, FROM_OFFSET, FROM_TIME) | value (u64:
                 the offset, or the time in ns since the epoch) | credit (u32)
                 the broker replays what it holds from the start, then sends every new batch as it is
                 accepted. Subscribing again replaces the subscription.
    CREDIT       | "TLM1" | "C" | topic | credit (u32)
                 Flow control (credit-based, as in the ZeroMQ guide): each DELIVER spends one credit; the
                 subscriber grants more as it consumes. While catching up the broker waits for credit; when
                 live it drops new batches for a subscriber without credit, and counts them. A subscriber
                 holds at most the broker's --subscriber-queue credits.
    UNSUBSCRIBE  | "TLM1" | "X" | topic

Consumer (of a group) -> broker

    CONSUME      | "TLM1" | "G" | topic | group | credit (u32)
                 join the group (or refresh): the broker may hand this consumer up to `credit`
                 unacknowledged messages. Sent again when idle, so a broker restart is survived.
    GROUP_ACK    | "TLM1" | "Y" | topic | group | offsets (u64 each, concatenated; 1 to MAX_ACK_OFFSETS)
                 counts only for messages delivered to this connection (others' offsets are counted
                 in the group's `foreign_acks` and ignored)
    LEAVE        | "TLM1" | "L" | topic | group     what it held goes back to the group at once

Broker -> consumer

    MESSAGE  | "TLM1" | "M" | topic | group | MSG_HEADER | message
             MSG_HEADER (44 B) = offset (u64) | deliveries (u32: 1 the first time) | producer id (16 B) |
                                 seq (u64) | received (u64, ns since the epoch)

Broker -> subscriber

    DELIVER  | "TLM1" | "D" | topic | DELIVER_HEADER | body
             DELIVER_HEADER (52 B) = first offset (u64) | count (u32) | missed (u64) | producer id (16 B) |
                                     first seq (u64) | received (u64, ns since the epoch)
             body as in PUBLISH (one accepted batch, or its tail); `missed` counts the messages this subscriber lost (its queue was full) since
             the previous DELIVER, so a subscriber always knows when it missed something.

Broker -> subscriber, consumer

    ERROR    | "TLM1" | "E" | command (1 B) | topic | reason (UTF-8)
             the SUBSCRIBE, CONSUME or GROUP_ACK (`command`) was refused: "unknown topic" (only a
             PUBLISH creates one), "too many subscribers", "too many groups", "too many members".
             Nothing was changed; a client may retry later (the clients here do so when idle).
    CLOSING  | "TLM1" | "Z" | topic [| group]
             the broker is shutting down: nothing more comes on this subscription (or group
             membership). A subscriber subscribes again, a consumer joins again, when the broker
             is back; what a consumer held unacknowledged is delivered again then.

Broker -> producer (routed back to the sending DEALER)

    ACK      | "TLM1" | "A" | ACK_BODY
             ACK_BODY (36 B) = producer id (16 B) | first seq (u64) | count (u32) | first offset (u64)
             first offset is DUPLICATE when every message was already accepted before.
             An ACK acknowledges the producer's messages first seq .. first seq + count - 1; the
             broker merges the acknowledgments of batches a producer sent back to back (within
             one burst) into one ACK, whose first offset is that of the first batch.
    NACK     | "TLM1" | "N" | NACK_BODY | code (1 B) | reason (UTF-8)
             NACK_BODY (36 B) = producer id (16 B) | first seq (u64) | count (u32) | expected seq (u64)
             code "S": sequence gap; resend from `expected seq`. An expected seq *below* what the
               broker already acknowledged means the broker lost acknowledged messages (its log was
               cut back, e.g. a crash under --fsync=interval): the producer cannot resend them, so it
               carries on under a new producer id (see broker.client.Publisher).
             code "U": the broker cannot store now (e.g. disk error); retry later.
             code "I": invalid batch (topic, size, count); retrying cannot help.

Sequence numbers are per producer and start anywhere; a producer id is 16 random bytes drawn
when the producer starts, so ids are unique across processes, restarts and machines. The broker
accepts a producer's batches in sequence order only: a batch it has already accepted is
acknowledged again as DUPLICATE and not stored twice, so retrying is always safe.
"""

from __future__ import annotations

import struct

SIGNATURE = b"TLM1"

PUBLISH = b"P"
REPORT = b"R"
ACK = b"A"
NACK = b"N"
SUBSCRIBE = b"S"
CREDIT = b"C"
UNSUBSCRIBE = b"X"
CONSUME = b"G"
GROUP_ACK = b"Y"
LEAVE = b"L"
MESSAGE = b"M"
DELIVER = b"D"
CLOSING = b"Z"
ERROR = b"E"

FROM_LIVE, FROM_BEGINNING, FROM_OFFSET, FROM_TIME = range(4)

NACK_SEQUENCE = b"S"
NACK_UNAVAILABLE = b"U"
NACK_INVALID = b"I"

PUB_HEADER = struct.Struct(">16sQI")
ACK_BODY = struct.Struct(">16sQIQ")
NACK_BODY = struct.Struct(">16sQIQ")
SUB_HEADER = struct.Struct(">BQI")
CREDIT_BODY = struct.Struct(">I")
MSG_HEADER = struct.Struct(">QI16sQQ")
OFFSET = struct.Struct(">Q")
DELIVER_HEADER = struct.Struct(">QIQ16sQQ")
PRODUCER_ID_BYTES = 16
MAX_ACK_OFFSETS = 65536  # offsets in one GROUP_ACK
DUPLICATE = 2**64 - 1

MAX_MESSAGE_BYTES = 1 << 20  # default per-message cap
MAX_FRAME_BYTES = 64 << 20  # the transport's cap on one PUBLISH (a batch), whatever the message cap
BATCH_BYTES = 8 << 20  # publishers keep batches below this (well inside the frame cap)


def batch_bytes(max_message_bytes: int) -> int:
    """The largest batch body a publisher should send: within the message cap too (then the
    broker's size check needs no split), but not below 64 KiB (batches stay worth sending)."""
    return max(min(BATCH_BYTES, max_message_bytes), 64 << 10)


def frame_limit(max_message_bytes: int) -> int:
    """The broker's transport cap (ZMQ_MAXMSGSIZE): a batch, or one message at its cap."""
    return max(MAX_FRAME_BYTES, max_message_bytes + (64 << 10))


SEPARATOR = b"\n"


def message_count(body: bytes) -> int:
    """The number of messages in a batch body (separators + 1). Deleting the separators and
    comparing lengths is exact and 2-3x faster than bytes.count on a body (memchr + memcpy
    instead of a byte-by-byte loop); measured 75 us vs 195 us for 4,000 messages."""
    return len(body) - len(body.replace(SEPARATOR, b"")) + 1


def publish_frames(topic: bytes, producer_id: bytes, first_seq: int, count: int, body: bytes) -> list[bytes]:
    return [SIGNATURE, PUBLISH, topic, PUB_HEADER.pack(producer_id, first_seq, count), body]


def report_frames(topic: bytes, producer_id: bytes, report: bytes) -> list[bytes]:
    return [SIGNATURE, REPORT, topic, producer_id, report]


def ack_frames(producer_id: bytes, first_seq: int, count: int, first_offset: int) -> list[bytes]:
    return [SIGNATURE, ACK, ACK_BODY.pack(producer_id, first_seq, count, first_offset)]


def nack_frames(producer_id: bytes, first_seq: int, count: int, code: bytes, reason: str, expected_seq: int = 0) -> list[bytes]:
    return [SIGNATURE, NACK, NACK_BODY.pack(producer_id, first_seq, count, expected_seq), code, reason.encode()]


def subscribe_frames(topic: bytes, start: int = FROM_LIVE, value: int = 0, credit: int = 100) -> list[bytes]:
    return [SIGNATURE, SUBSCRIBE, topic, SUB_HEADER.pack(start, value, credit)]


def credit_frames(topic: bytes, credit: int) -> list[bytes]:
    return [SIGNATURE, CREDIT, topic, CREDIT_BODY.pack(credit)]


def deliver_frames(topic: bytes, first_offset: int, count: int, missed: int, producer: bytes, first_seq: int, received_ns: int, body: bytes) -> list[bytes]:
    return [SIGNATURE, DELIVER, topic, DELIVER_HEADER.pack(first_offset, count, missed, producer, first_seq, received_ns), body]


def consume_frames(topic: bytes, group: bytes, credit: int) -> list[bytes]:
    return [SIGNATURE, CONSUME, topic, group, CREDIT_BODY.pack(credit)]


def group_ack_frames(topic: bytes, group: bytes, offsets: list[int]) -> list[bytes]:
    return [SIGNATURE, GROUP_ACK, topic, group, struct.pack(f">{len(offsets)}Q", *offsets)]


def message_frames(topic: bytes, group: bytes, offset: int, deliveries: int, producer: bytes, seq: int, received_ns: int, payload: bytes) -> list[bytes]:
    return [SIGNATURE, MESSAGE, topic, group, MSG_HEADER.pack(offset, deliveries, producer, seq, received_ns), payload]


def error_frames(command: bytes, topic: bytes, reason: str) -> list[bytes]:
    return [SIGNATURE, ERROR, command, topic, reason.encode()]


def closing_frames(topic: bytes, group: bytes | None = None) -> list[bytes]:
    return [SIGNATURE, CLOSING, topic] if group is None else [SIGNATURE, CLOSING, topic, group]
