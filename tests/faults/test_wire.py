"""The ZeroMQ and HTTP ports under garbage: bad frames, oversized frames, non-ZeroMQ peers, a flood
of connections, malformed HTTP. Each is counted (and logged at a bounded rate) and everyone else
keeps being served."""

import socket

import pytest
import zmq
from helpers import PRODUCER, broker_and_dealer, dealer_socket, get_json, publish, start_broker, wait_until

from broker import protocol as p


@pytest.fixture
def broker(procs):
    with broker_and_dealer(procs, "--max-message-bytes=1KiB") as started:
        yield started


def acked(reply: list[bytes]) -> tuple:
    """(producer, first seq, count) of an ACK."""
    assert reply[1] == p.ACK, reply
    return p.ACK_BODY.unpack(reply[2])[:3]


def connections(http: str) -> dict:
    return get_json(f"{http}/stats")[1]["connections"]


def test_garbage_frames_are_counted_and_ignored_and_the_broker_keeps_serving(broker):
    proc, dealer, http, zmq_url = broker
    dealer.send_multipart([b"hello"])
    dealer.send_multipart([p.SIGNATURE, b"?", b"x"])
    dealer.send_multipart([p.SIGNATURE, p.PUBLISH, b"telemetry", b"short", b"{}"])
    host, port = zmq_url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:  # not even ZeroMQ
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)
    assert publish(dealer, 0, [1]) == p.ack_frames(PRODUCER, 0, 1, 0)
    stats = wait_until(lambda: (s := get_json(f"{http}/stats")[1])["bad_frames"].get("bad_header") and s)
    assert stats["bad_frames"]["unknown_command"] == 1 and stats["bad_frames"]["bad_header"] == 1
    assert stats["bad_frames"]["not_protocol"] >= 1  # libzmq may also frame raw bytes as legacy ZMTP/1.0
    assert stats["topics"]["telemetry"]["messages"] == 1
    assert "ignored a bad frame" in proc.output


def test_oversized_messages_and_frames(broker):
    proc, dealer, http, zmq_url = broker
    # a message over --max-message-bytes: refused (never resent), counted, logged
    reply = publish(dealer, 0, ["x" * 2000])
    assert reply[1] == p.NACK and reply[3] == p.NACK_INVALID and reply[4] == b"message_too_large"
    # a batch of small messages may be larger than one message's cap
    assert publish(dealer, 0, ["y" * 900] * 100) == p.ack_frames(PRODUCER, 0, 100, 0)
    # a frame over the transport cap: ZeroMQ drops that peer's connection before allocating it
    ctx = zmq.Context()
    try:
        big = dealer_socket(ctx, zmq_url)
        big.send_multipart(p.publish_frames(b"telemetry", b"\x02" * 16, 0, 1, b"z" * (p.frame_limit(1024) + 1)))
        wait_until(lambda: connections(http)["closed"] >= 1, message="the oversized sender's connection to be closed")
        big.close()
    finally:
        ctx.term()
    assert publish(dealer, 100, [1]) == p.ack_frames(PRODUCER, 100, 1, 100)  # everyone else is still served
    stats = get_json(f"{http}/stats")[1]
    assert stats["bad_frames"] == {"message_too_large": 1}
    assert stats["topics"]["telemetry"]["rejected"] == {"message_too_large": 1}
    assert stats["topics"]["telemetry"]["messages"] == 101
    assert "ignored a bad frame (message_too_large)" in proc.output


def test_a_flood_of_connections_is_counted_and_the_broker_keeps_serving(broker):
    proc, dealer, http, zmq_url = broker
    host, port = zmq_url.rsplit("//", 1)[1].rsplit(":", 1)
    raw_count, zmq_count = 300, 200
    raw = []
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    peers = []
    try:
        for i in range(raw_count):  # peers that are not ZeroMQ at all, kept open
            conn = socket.create_connection((host, int(port)), timeout=5)
            conn.sendall(b"\xff" + bytes(range(i % 7, 200)))
            raw.append(conn)
        for i in range(zmq_count):  # ZeroMQ peers that publish once
            peer = dealer_socket(ctx, zmq_url)
            peer.send_multipart(p.publish_frames(b"telemetry", i.to_bytes(16, "big"), 0, 1, b'{"flood":%d}' % i))
            peers.append(peer)
        # while the flood is open, a well-behaved producer is still served
        assert acked(publish(dealer, 0, [1])) == (PRODUCER, 0, 1)
        wait_until(lambda: connections(http)["accepted"] >= raw_count + zmq_count + 1, message="every connection to be counted")
        wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] == zmq_count + 1, message="each flood peer's message")
    finally:
        for conn in raw:
            conn.close()
        for peer in peers:
            peer.close()
        ctx.term()
    stats = wait_until(lambda: (c := connections(http))["open"] == 1 and c, message="the flood's connections to be closed")
    assert stats["closed"] >= raw_count + zmq_count
    assert get_json(f"{http}/healthz") == (200, {"status": "ok"})
    assert acked(publish(dealer, 1, [2])) == (PRODUCER, 1, 1)
    # a bounded number of warnings, not one per connection
    assert proc.output.count("does not speak ZeroMQ") <= 1


def test_malformed_http_requests_leave_the_broker_serving(procs):
    broker, _, http = start_broker()
    procs.append(broker)
    host, port = http.rsplit("//", 1)[1].split(":")
    garbage = [
        b"\x00\xff\x13garbage\r\n\r\n",
        b"GET /stats HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST /stats HTTP/1.1\r\nContent-Length: 999999\r\n\r\nshort",
    ]
    for payload in garbage:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(payload)
            conn.settimeout(2)
            try:
                conn.recv(1024)
            except (TimeoutError, ConnectionResetError):
                pass
    assert get_json(f"{http}/healthz") == (200, {"status": "ok"})
    status, body = get_json(f"{http}/stats/telemetry")
    assert status == 200 and body["topic"] == "telemetry"


def test_a_peer_that_fails_the_zeromq_handshake_is_counted(broker):
    _, _, http, zmq_url = broker
    host, port = zmq_url.rsplit("//", 1)[1].rsplit(":", 1)
    before = connections(http)["handshake_failed"]
    # a ZMTP 3.0 greeting that asks for a security mechanism the broker does not speak
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"BOGUS".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(greeting)
        wait_until(lambda: connections(http)["handshake_failed"] == before + 1, message="the failed handshake to be counted")
    assert publish(broker[1], 0, [1]) == p.ack_frames(PRODUCER, 0, 1, 0)  # everyone else is still served


def test_sequence_numbers_past_the_largest_are_a_bad_frame(broker):
    proc, dealer, http, _ = broker
    largest = 2**64 - 1  # a producer's next expected sequence number must fit in u64 too
    reply = publish(dealer, largest - 2, [1, 2, 3])
    assert reply[1] == p.NACK and reply[3] == p.NACK_INVALID and reply[4] == b"bad_sequence"
    assert publish(dealer, largest - 2, [1, 2]) == p.ack_frames(PRODUCER, largest - 2, 2, 0)  # next expected: the largest
    stats = get_json(f"{http}/stats")[1]
    assert stats["bad_frames"] == {"bad_sequence": 1} and stats["topics"]["telemetry"]["rejected"] == {"bad_sequence": 3}
    assert "internal_error" not in proc.output
