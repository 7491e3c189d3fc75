"""`telemetry-broker tail --broker-url nats://...`: a JetStream stream's messages as JSON lines.

An ordered push consumer (ephemeral, flow-controlled, re-created by nats-py after a gap or a
reconnect) on the topic's subject and `<topic>.>` (where the streamer's --key-columns sends keyed
messages): new messages, or from the start, a stream sequence or a time. With --meta each line
wraps the message: {"seq", "msg_id", "received", "message"}, where `seq` is the stream sequence
and `msg_id` the Nats-Msg-Id (`<producer>-<sequence>`); a keyed message's line also has its
"subject".
"""

from __future__ import annotations

import asyncio
import datetime

import orjson

from common.natsconn import NatsConnection, failure
from common.timefmt import rfc3339_ns


async def tail(
    connection: NatsConnection, stream: str, topic: str, *, from_beginning: bool, from_seq, from_time_ns, meta: bool, count, out, stop: asyncio.Event
):
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected and failure(exc):  # TLS or credentials refused at start: stop trying, say why in one line
            raise exc

    nc = await connection.open_client("telemetry-broker tail", max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error)
    connected = True
    try:
        js = nc.jetstream()
        options: dict = {"deliver_policy": DeliverPolicy.NEW}
        if from_beginning:
            options = {"deliver_policy": DeliverPolicy.ALL}
        elif from_seq is not None:
            options = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": max(1, from_seq)}
        elif from_time_ns is not None:
            start = datetime.datetime.fromtimestamp(from_time_ns / 1e9, datetime.UTC).isoformat().replace("+00:00", "Z")
            options = {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start}
        # the topic's subject and, for keyed messages (the streamer's --key-columns), `<topic>.<key>`
        sub = await js.subscribe("", stream=stream, ordered_consumer=True, config=ConsumerConfig(filter_subjects=[topic, topic + ".>"]), **options)
        keyed_from = len(topic) + 1
        printed = 0
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            if meta:
                md = msg.metadata
                msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
                received = int(md.timestamp.timestamp() * 1e9) if md.timestamp else 0
                subject = b""
                if len(msg.subject) >= keyed_from:  # a keyed message: say where it went
                    subject = b'"subject":%s,' % orjson.dumps(msg.subject)
                out.write(
                    b'{"seq":%d,"msg_id":"%s",%s"received":"%s","message":%s}\n'
                    % (md.sequence.stream, msg_id.encode(), subject, rfc3339_ns(received).encode(), msg.data)
                )
            else:
                out.write(msg.data + b"\n")
            printed += 1
            if count is not None and printed >= count:
                break
            if sub.pending_msgs == 0:
                out.flush()
        out.flush()
    finally:
        try:
            await asyncio.wait_for(nc.close(), 2)
        except Exception:
            pass
    return 0
