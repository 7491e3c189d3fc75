"""NATS JetStream as a destination (--broker-url nats://... or tls://...).

Each row is one NATS message on subject = the topic, body = the row's JSON message, with the
header `Nats-Msg-Id: <producer id hex>-<sequence>`. JetStream answers every message with a
PubAck; a message counts as published only once its PubAck arrived. A resend carries the same
id, so the server's de-duplication (the stream's duplicate window) keeps it from landing twice.

The wire, per message (one `%` format each, pre-encoded everywhere else):

    HPUB <topic> _INBOX.<nuid>.<seq> <hdr len> <total len>\\r\\n
    NATS/1.0\\r\\nNats-Msg-Id: <producer>-<seq>\\r\\n\\r\\n<json>\\r\\n

Every reply subject ends in the message's sequence number, under one wildcard subscription
(`_INBOX.<nuid>.*`), so a PubAck needs no per-request future: `_AckParser` picks PubAcks out of
the read buffer with one regular expression per message and marks them in a bitmap of the
window. Anything else (errors, 503 "no responders", other traffic) takes nats-py's own path.

Window: the batches sent and not yet fully acknowledged are held (their messages) up to
32,768 messages (or --buffer-messages if smaller) and 16 MiB; `publish` waits for room
(backpressure). A 429 (JetStream's queue, shared by all publishers, is full) halves that
limit; each clean second grows it back by a batch. They are sent
again, whole, when the connection comes back, when no acknowledgment has arrived for
`ACK_TIMEOUT_S` (a leader change, a lost reply), or soon after the server answered a message
with a transient error. Already stored messages among them come back as duplicates (and count
once). nats-py reconnects on its own (to any server of the cluster it knows).

`prepare` runs in the parent before any worker starts: it waits (up to --nats-connect-wait) for a
server and JetStream, checks the credentials, the stream and that its subjects cover the topic,
creates or fixes the stream with --nats-create-stream, and says what is wrong in one line.
`StreamMonitor` is the parent's view of the stream's state for /stats and /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import deque

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.js.api import StorageType, StreamConfig
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from broker.client import DEFAULT_WINDOW_BYTES
from broker.protocol import PRODUCER_ID_BYTES
from common.natsconn import NatsConnection, address, failure, subject_covers

from . import DestinationError

log = logging.getLogger("streamer.nats")

MAX_LIMIT = 32768  # messages in flight at most (or --buffer-messages if smaller): more only lengthens a drain
MIN_LIMIT = 1024
ERROR_LOG_INTERVAL_S = 30.0
ACK_TIMEOUT_S = 2.0  # resend what is unacknowledged when no PubAck arrived for this long
MAX_RESEND_INTERVAL_S = 30.0
ERROR_RESEND_S = 0.25  # after a transient error reply, resend this soon
# error replies worth a resend: 408 timeout, 409 "duplicate message id is in process" (the first
# copy is still being replicated after a leader change: the resend gets its PubAck, or stores it),
# 429 too many requests, 500, 503 no leader
TRANSIENT_CODES = {408, 409, 429, 500, 503}
_HEADER_START = b"NATS/1.0\r\nNats-Msg-Id: "


async def connect(connection: NatsConnection, name: str, *, reconnect: bool, **callbacks) -> nats.NATS:
    """A nats-py client; with `reconnect`, it reconnects forever by itself."""
    options = dict(callbacks)
    if reconnect:
        options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, ping_interval=5, max_outstanding_pings=2)
    else:
        options.update(allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0.1)  # 0 would mean: forever
    options.setdefault("error_cb", _quiet)
    options.setdefault("connect_timeout", 2)
    return await connection.open_client(name, **options)


async def _quiet(exc: Exception) -> None:
    log.debug("NATS: %s", exc)


# -- start-up checks (the parent) ------------------------------------------------------------------


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ")


async def prepare(cfg) -> int:
    """Check (and with --nats-create-stream, set up) the stream before any worker starts.

    Returns the largest message body the servers take (their max_payload less our header).
    Raises DestinationError with one line for the user."""
    n = cfg.nats
    where = n.connection.shown
    deadline = time.monotonic() + n.connect_wait
    errors: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = None
    waited = False
    while nc is None:
        errors.clear()
        try:
            nc = await asyncio.wait_for(connect(n.connection, "telemetry-streamer", reconnect=False, error_cb=on_error), 10)
        except Exception as exc:
            reason = _why(errors[-1] if errors else exc)
            refused = next(filter(None, map(failure, [exc, *errors])), None)
            if refused:  # TLS or credentials: waiting will not help
                raise DestinationError(f"NATS at {where}: {refused}") from None
            if time.monotonic() >= deadline:
                raise DestinationError(f"no NATS server reachable at {where} within {n.connect_wait:g} s ({reason})") from None
            if not waited:
                log.warning("Waiting for a NATS server at %s (%s)", where, reason)
                waited = True
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    try:
        if not nc._server_info.get("jetstream"):
            raise DestinationError(f"JetStream is not enabled on the NATS server at {address(nc.connected_url)} (start it with -js)")
        js = nc.jetstream(timeout=2)
        info = None
        waiting_for = ""
        while info is None:
            try:
                info = await _find_or_create(js, cfg)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError, _NotYet) as exc:
                reason = _why(exc)
                if time.monotonic() >= deadline:  # e.g. a cluster still electing its JetStream leader, or with too few peers yet
                    raise DestinationError(f"JetStream at {where} did not answer within {n.connect_wait:g} s ({reason})") from None
                if reason != waiting_for:  # once per reason: a timeout, then "cannot place 3 replicas"
                    waiting_for = reason
                    log.warning("Waiting for JetStream at %s (%s)", where, reason)
                await asyncio.sleep(0.25)
            except nats.js.errors.APIError as exc:
                raise DestinationError(f"JetStream refused the stream request for {n.stream!r}: {exc.description or exc}") from None
        for needed in stream_subjects(cfg):
            subjects = info.config.subjects or []
            if any(subject_covers(s, needed) for s in subjects):
                continue
            if not n.create_stream:
                raise DestinationError(
                    f"stream {n.stream!r} does not take subject {needed!r} (its subjects: {', '.join(subjects) or 'none'}); "
                    "add it, or pass --nats-create-stream"
                )
            info.config.subjects = [*subjects, needed]
            try:
                info = await js.update_stream(info.config)
            except nats.js.errors.APIError as exc:
                raise DestinationError(f"cannot add subject {needed!r} to stream {n.stream!r}: {exc.description or exc}") from None
            log.info("Stream %s: subject %s added", n.stream, needed)
        state = info.state
        log.info(
            "NATS %s (server %s), stream %s: %d messages, %d replicas, %s storage",
            where,
            nc.connected_server_version,
            n.stream,
            state.messages,
            info.config.num_replicas or 1,
            getattr(info.config.storage, "value", info.config.storage),
        )
        return nc.max_payload - len(_HEADER_START) - 2 * PRODUCER_ID_BYTES - 32
    except (nats.errors.Error, OSError) as exc:
        raise DestinationError(f"NATS at {where}: {_why(exc)}") from None
    finally:
        await _close(nc)


class _NotYet(Exception):
    """The cluster cannot place the stream yet (its servers are still joining): retried until --nats-connect-wait."""


async def _find_or_create(js, cfg):
    """The stream's info; with --nats-create-stream it is created when missing. Raises _NotYet
    while a cluster cannot place it (retried by the caller: raised from an `except` clause of the
    caller's own try, it would escape the clause meant to retry it)."""
    n = cfg.nats
    try:
        return await js.stream_info(n.stream)
    except nats.js.errors.NotFoundError:
        if not n.create_stream:
            raise DestinationError(f"JetStream has no stream {n.stream!r} (create it, or pass --nats-create-stream)") from None
    return await _create(js, cfg)


async def _create(js, cfg):
    n = cfg.nats
    config = StreamConfig(
        name=n.stream,
        subjects=stream_subjects(cfg),
        num_replicas=n.replicas,
        storage=StorageType.FILE if n.storage == "file" else StorageType.MEMORY,
        max_bytes=n.max_bytes or -1,
        max_age=n.max_age or 0,
        duplicate_window=n.duplicate_window,
    )
    try:
        info = await js.add_stream(config)
    except nats.js.errors.APIError as exc:
        if exc.err_code == 10058:  # created by another streamer meanwhile
            return await js.stream_info(n.stream)
        if exc.err_code == 10005 or "no suitable peers" in (exc.description or ""):  # fewer servers than replicas, so far
            raise _NotYet(f"cannot place {n.replicas} replicas: {exc.description}") from None
        raise DestinationError(f"cannot create stream {n.stream!r}: {exc.description or exc}") from None
    log.info("Created stream %s (subjects %s, %d replicas, %s storage)", n.stream, ", ".join(stream_subjects(cfg)), n.replicas, n.storage)
    return info


_SUBJECT_UNSAFE = re.compile(rb"[^A-Za-z0-9_-]")


def stream_subjects(cfg) -> list[str]:
    """The subjects the stream must take: the topic, and with --key-columns every `<topic>.<key>`."""
    return [cfg.topic, cfg.topic + ".>"] if cfg.replay.key_columns else [cfg.topic]


def key_subject(topic: bytes, key: str) -> bytes:
    """`<topic>.<part>.<part>` for a message key `part/part` (streamer.replay joins key columns by
    `/`): one subject token per key column, each made subject-safe (anything but letters, digits,
    `_` and `-` becomes `_`; an empty value is `_`), so `telemetry.dgx-a100-01.*` selects a host."""
    return topic + b"".join(b"." + (_SUBJECT_UNSAFE.sub(b"_", part.encode()) or b"_") for part in key.split("/"))


async def _close(nc) -> None:
    if nc is not None and not nc.is_closed:
        try:
            await asyncio.wait_for(nc.close(), 2)
        except (TimeoutError, Exception):
            pass


# -- the stream's state (the parent) ---------------------------------------------------------------


class StreamMonitor:
    """The parent's connection to read the stream's state (for /stats and /metrics)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.nc = None
        self.state: dict | None = None  # the last state read
        self.error: str | None = None

    async def start(self) -> None:
        self.nc = await connect(self.cfg.nats.connection, "telemetry-streamer-stats", reconnect=True)

    async def refresh(self) -> dict | None:
        try:
            info = await self.nc.jetstream(timeout=1).stream_info(self.cfg.nats.stream)
        except Exception as exc:
            self.error = _why(exc)
            return self.state
        s, cluster = info.state, info.cluster
        self.error = None
        self.state = {
            "stream": self.cfg.nats.stream,
            "messages": s.messages,
            "bytes": s.bytes,
            "first_seq": s.first_seq,
            "last_seq": s.last_seq,
            "consumer_count": s.consumer_count,
            "replicas": info.config.num_replicas or 1,
            "storage": getattr(info.config.storage, "value", info.config.storage),
            "cluster": None
            if cluster is None
            else {
                "name": cluster.name,
                "leader": cluster.leader,
                "replicas": [{"name": r.name, "current": r.current, "active_s": r.active, "lag": r.lag} for r in (cluster.replicas or [])],
            },
            "server": address(self.nc.connected_url),
        }
        return self.state

    async def close(self) -> None:
        await _close(self.nc)


# -- publishing (a worker) -------------------------------------------------------------------------


class _AckParser(Parser):
    """nats-py's protocol parser with a fast path for this publisher's PubAcks.

    A read usually ends inside a PubAck; that tail waits in the buffer for the next read (were
    it handed to nats-py's parser, the whole next read would take the slow path after it)."""

    def __init__(self, nc, on_acks):
        super().__init__(nc)
        self._on_acks = on_acks
        self._ack = None
        self._head = b""

    def arm(self, inbox_prefix: bytes, sid: int) -> None:
        # MSG _INBOX.<nuid>.<seq> <sid> <size>\r\n{"stream":...}\r\n : anything else takes the slow path
        self._head = b"MSG " + inbox_prefix
        self._ack = re.compile(rb"MSG " + re.escape(inbox_prefix) + rb"(\d+) " + str(sid).encode() + rb" (\d+)\r\n(?=\{\"stream\")").match

    def _partial_reply(self) -> bool:
        """Whether the buffer starts with an incomplete message to this publisher's inbox."""
        buf, head = self.buf, self._head
        if len(buf) < len(head):
            return head.startswith(buf)
        if not buf.startswith(head):
            return False
        line_end = buf.find(b"\r\n")
        if line_end == -1:
            return len(buf) < 1024
        try:
            size = int(buf[:line_end].rsplit(b" ", 1)[1])
        except ValueError:
            return False
        return len(buf) < line_end + 2 + size + 2

    async def parse(self, data: bytes = b""):
        buf = self.buf
        buf.extend(data)
        match = self._ack
        if match is not None and self.state == AWAITING_CONTROL_LINE:
            pos, end_of_buf, seqs = 0, len(buf), []
            while True:
                m = match(buf, pos)
                if m is None:
                    break
                end = m.end() + int(m.group(2)) + 2
                if end > end_of_buf:
                    break
                seqs.append(int(m.group(1)))
                pos = end
            if pos:
                del buf[:pos]
                self._on_acks(seqs)
            if not buf or self._partial_reply():
                return
        if buf:
            await super().parse()


class NatsDestination:
    def __init__(self, cfg):
        self.cfg = cfg
        self.label = "NATS publisher"  # the worker names it after itself
        self.on_acknowledged = None  # called (no arguments) whenever PubAcks arrive (streamer.destinations)
        self.window = cfg.buffer_messages
        self.window_bytes = DEFAULT_WINDOW_BYTES
        self.producer_id = os.urandom(PRODUCER_ID_BYTES)
        self.published = 0
        self.rejected = 0
        self.lost_by_broker = 0
        self.resent = 0  # messages sent again
        self.transient_errors = 0  # error replies worth a resend (429 too many requests, 503 no leader)
        self.nc = None
        self._sid = 0
        self._inbox = b""
        self._next_seq = 0
        self._base = 0  # sequence of the first message held
        self._done = bytearray()  # per held message (index seq - base): 1 once acknowledged or rejected
        self._batches: deque[tuple[int, list[bytes], int]] = deque()  # (first seq, messages, wire size)
        self._subjects: dict[int, list[bytes]] = {}  # first seq -> each message's subject, for keyed batches (--key-columns)
        self._held_bytes = 0
        self._outstanding = 0  # held and not yet acknowledged
        # in flight at most `_limit` messages: halved when JetStream says it has too many requests
        # (its queue per stream is shared by every publisher), grown back by a batch per clean second
        self._limit = self._max_limit = min(self.window, MAX_LIMIT)
        self._room = asyncio.Event()
        self._progress_at = time.monotonic()
        self._resend_interval = ACK_TIMEOUT_S
        self._retry: list[int] = []  # sequences answered with a transient error
        self._retry_at = 0.0
        self._last_error_at = 0.0
        self._errors_logged_at = 0.0
        self._outage_since: float | None = None  # connection lost, or acknowledgments stopped
        self._tasks: list[asyncio.Task] = []
        self._rejections_logged: set = set()
        self._closing = False

    @property
    def unacked(self) -> int:
        return self._outstanding

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> None:
        connection = self.cfg.nats.connection
        delay = 0.5
        while self.nc is None:
            try:
                nc = await connect(
                    connection,
                    f"telemetry-streamer {self.producer_id.hex()}",
                    reconnect=True,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                )
            except Exception as exc:
                log.warning("%s: cannot reach NATS at %s (%s); retrying in %.1f s", self.label, connection.shown, _why(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.nc = nc
        nc = self.nc
        nc._ps = _AckParser(nc, self._acknowledged)  # nats-py keeps its parser across reconnects
        self._inbox = f"_INBOX.{nc._nuid.next().decode()}.".encode()
        sub = await nc.subscribe(self._inbox.decode() + "*", cb=self._never_called)
        self._sid = sub._id
        nc._ps.arm(self._inbox, self._sid)
        slow_path = nc._process_msg

        async def process_msg(sid, subject, reply, data, headers):
            if sid == self._sid:
                self._reply(subject, data, headers)
            else:
                await slow_path(sid, subject, reply, data, headers)

        nc._process_msg = process_msg
        topic = self.cfg.topic.encode()
        id_prefix = self.producer_id.hex().encode() + b"-"
        self._header_len = len(_HEADER_START) + len(id_prefix) + 4  # + the sequence's digits
        self._format = b"HPUB " + topic + b" " + self._inbox + b"%d %d %d\r\n" + _HEADER_START + id_prefix + b"%d\r\n\r\n%s\r\n"
        self._keyed_format = b"HPUB %s " + self._inbox + b"%d %d %d\r\n" + _HEADER_START + id_prefix + b"%d\r\n\r\n%s\r\n"
        self._tasks = [asyncio.create_task(self._watch())]

    async def _never_called(self, msg) -> None:  # replies are handled in process_msg
        pass

    # -- the hot path ---------------------------------------------------------------------------

    async def publish(self, body: bytes, count: int, subjects: list[bytes] | None = None) -> None:
        """Send `count` newline-joined messages, one NATS message each; waits while the window is
        full. `subjects`: each message's own subject (keyed replay), instead of the topic."""
        while self._batches and (self._next_seq - self._base + count > self._limit or self._held_bytes > self.window_bytes):
            self._room.clear()
            await self._room.wait()
        first = self._next_seq
        messages = body.split(b"\n")
        if subjects is None:
            wire = self._encode(first, messages)
        else:
            self._subjects[first] = subjects
            wire = b"".join([self._encode_one(seq, m, subject) for seq, m, subject in zip(range(first, first + count), messages, subjects)])
        self._next_seq = first + count
        self._done.extend(bytes(count))
        self._batches.append((first, messages, len(body)))
        self._held_bytes += len(body)
        self._outstanding += count
        if self._outstanding == count:  # nothing was outstanding: the ack clock starts now
            self._progress_at = time.monotonic()
        await self._send(wire)

    async def _send(self, wire: bytes) -> None:
        nc = self.nc
        if nc.is_connected:  # else held until the reconnection resends it
            nc._pending.append(wire)
            nc._pending_data_size += len(wire)
            await nc._flush_pending()

    def _encode(self, first: int, messages: list[bytes]) -> bytes:
        fmt = self._format
        last = first + len(messages) - 1
        digits = len(str(first))
        if len(str(last)) == digits:
            h = self._header_len + digits
            return b"".join([fmt % (seq, h, h + len(m), seq, m) for seq, m in zip(range(first, last + 1), messages)])
        h = self._header_len
        return b"".join([fmt % (seq, h + len(str(seq)), h + len(str(seq)) + len(m), seq, m) for seq, m in zip(range(first, last + 1), messages)])

    def _encode_one(self, seq: int, m: bytes, subject: bytes | None) -> bytes:
        h = self._header_len + len(str(seq))
        if subject is None:
            return self._format % (seq, h, h + len(m), seq, m)
        return self._keyed_format % (subject, seq, h, h + len(m), seq, m)

    def _acknowledged(self, seqs: list[int]) -> None:
        """PubAcks (duplicates included: the message is in the stream either way)."""
        done, base, new = self._done, self._base, 0
        held = len(done)
        for seq in seqs:
            i = seq - base
            if 0 <= i < held and not done[i]:
                done[i] = 1
                new += 1
        if new:
            self.published += new
            self._settled(new)
            if self.on_acknowledged is not None:
                self.on_acknowledged()

    def _settled(self, new: int) -> None:
        self._outstanding -= new
        self._progress_at = time.monotonic()
        self._resend_interval = ACK_TIMEOUT_S
        if self._outage_since is not None and self.nc.is_connected:
            log.info("%s: acknowledgments from NATS resumed after %.1f s", self.label, time.monotonic() - self._outage_since)
            self._outage_since = None
        batches, done = self._batches, self._done
        freed = 0
        while batches:
            first, messages, size = batches[0]
            if done.find(0, first - self._base, first - self._base + len(messages)) != -1:
                break
            batches.popleft()
            if self._subjects:
                self._subjects.pop(first, None)
            freed += len(messages)
            self._held_bytes -= size
        if freed:
            del done[:freed]
            self._base += freed
            self._room.set()

    # -- replies off the fast path --------------------------------------------------------------

    def _reply(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            seq = int(subject[len(self._inbox) :])
        except ValueError:
            return
        if data.startswith(b'{"stream"'):
            self._acknowledged([seq])
            return
        code, description = 503, "no responders: the stream has no leader"
        if data.startswith(b'{"error"'):
            error = orjson.loads(data).get("error", {})
            code, description = error.get("code", 0), error.get("description", "")
        elif headers and not headers.startswith(b"NATS/1.0 503"):
            return
        now = time.monotonic()
        if code in TRANSIENT_CODES:
            self.transient_errors += 1
            self._retry.append(seq)
            if not self._retry_at:
                self._retry_at = now + ERROR_RESEND_S
            if code == 429 and now - self._last_error_at > ERROR_RESEND_S:  # JetStream's queue is full: fewer in flight
                self._limit = max(self._limit // 2, MIN_LIMIT)
            self._last_error_at = now
            if now - self._errors_logged_at >= ERROR_LOG_INTERVAL_S:
                self._errors_logged_at = now
                log.warning(
                    "%s: JetStream answered %d (%s); such messages are resent (%d so far; in flight now at most %d)",
                    self.label,
                    code,
                    description,
                    self.transient_errors,
                    self._limit,
                )
            return
        i = seq - self._base  # a permanent refusal: counted, never resent
        if 0 <= i < len(self._done) and not self._done[i]:
            self._done[i] = 1
            self.rejected += 1
            if code not in self._rejections_logged:
                self._rejections_logged.add(code)
                log.error("%s: JetStream refused a message (%d: %s); such messages are counted as rejected, not resent", self.label, code, description)
            self._settled(1)

    # -- outages and resends --------------------------------------------------------------------

    async def _disconnected(self) -> None:
        if self._closing:
            return
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        log.warning("%s: lost the connection to NATS; reconnecting (%d messages unacknowledged)", self.label, self._outstanding)

    async def _reconnected(self) -> None:
        since = self._outage_since or time.monotonic()
        log.info(
            "%s: reconnected to NATS %s after %.1f s; resending %d unacknowledged messages",
            self.label,
            address(self.nc.connected_url),
            time.monotonic() - since,
            self._outstanding,
        )
        self._outage_since = None
        self._progress_at = time.monotonic()
        await self._resend()

    async def _watch(self) -> None:
        """Resend what is overdue or was answered with a transient error; grow the in-flight limit back."""
        grown_at = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now - grown_at >= 1.0:
                grown_at = now
                if now - self._last_error_at >= 1.0 and self._limit < self._max_limit:
                    self._limit = min(self._max_limit, self._limit + self.cfg.batch_messages)
            if not self._outstanding or not self.nc.is_connected:
                continue
            if self._retry and now >= self._retry_at:
                retry, self._retry, self._retry_at = self._retry, [], 0.0
                await self._resend(retry)
            elif now - self._progress_at >= self._resend_interval:
                if self._outage_since is None:
                    self._outage_since = self._progress_at
                    log.warning(
                        "%s: no acknowledgment from NATS for %.1f s; resending %d unacknowledged messages (same ids)",
                        self.label,
                        now - self._progress_at,
                        self._outstanding,
                    )
                self._progress_at = now
                self._resend_interval = min(self._resend_interval * 2, MAX_RESEND_INTERVAL_S)
                self._retry, self._retry_at = [], 0.0
                await self._resend()

    async def _resend(self, only: list[int] | None = None) -> None:
        """Send unacknowledged messages again with their ids: `only` these sequences, or all held."""
        if not self.nc.is_connected:
            return
        done, base, fmt, h = self._done, self._base, self._format, self._header_len
        wire = []
        for first, messages, _size in self._batches:
            subjects = self._subjects.get(first)
            if only is None:
                if done.find(0, first - base, first - base + len(messages)) == -1:
                    continue
                seqs = range(first, first + len(messages))
            else:
                seqs = only
            for seq in seqs:
                i = seq - base
                if first <= seq < first + len(messages) and not done[i]:
                    m = messages[seq - first]
                    if subjects is not None:
                        wire.append(self._encode_one(seq, m, subjects[seq - first]))
                        continue
                    digits = len(str(seq))
                    wire.append(fmt % (seq, h + digits, h + digits + len(m), seq, m))
        self.resent += len(wire)
        if wire:
            await self._send(b"".join(wire))

    # -- drain ----------------------------------------------------------------------------------

    async def report(self, counters: dict) -> None:
        """The worker's counters reach the parent's /stats through its status pipe; nothing to send."""

    async def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._outstanding:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return True

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await _close(self.nc)
