"""Property test (hypothesis): random and mutated frames, over a real socket, to a real broker.
Whatever arrives, the broker keeps running, and afterwards an honest producer, subscriber and
consumer are served and /stats, /metrics and /healthz answer 200. Bounded: a few hundred examples
(about 20 s on a shared 2-core machine)."""

import json
import time
import urllib.request

import pytest
import zmq
from helpers import PRODUCER, dealer_socket, get_json, publish, start_broker, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as p

pytestmark = pytest.mark.timeout(240)

U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1]))
U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
TOPICS = st.one_of(st.sampled_from([b"telemetry", b"telemetry.dlq", b"t1", b"", b"..", b"a/b", b"x" * 129]), st.binary(max_size=40))
GROUPS = st.one_of(st.sampled_from([b"g", b"h", b"", b"\xff"]), st.binary(max_size=20))
PRODUCERS = st.one_of(st.sampled_from([PRODUCER, b"\x02" * 16]), st.binary(min_size=16, max_size=16), st.binary(max_size=20))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
REPORTS = st.one_of(
    st.dictionaries(
        st.sampled_from(["name", "skipped", "other"]), JSON | st.dictionaries(st.sampled_from(["field_count", "malformed", "zzz"]), JSON), max_size=3
    ).map(lambda value: json.dumps(value).encode()),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
)
BODIES = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from([b'{"v":1}', b"", b"{}", b"x" * 100]), min_size=1, max_size=6).map(b"\n".join))


@st.composite
def valid_frames(draw) -> list[bytes]:
    """One frame of every kind a peer may send, with every field drawn from its whole range."""
    kind = draw(st.sampled_from("PRSCXGYL"))
    topic, group = draw(TOPICS), draw(GROUPS)
    if kind == "P":
        body = draw(BODIES)
        count = draw(st.one_of(st.just(p.message_count(body)), U32))
        return p.publish_frames(topic, draw(PRODUCERS), draw(U64), count, body)
    if kind == "R":
        return p.report_frames(topic, draw(PRODUCERS), draw(REPORTS))
    if kind == "S":
        return [p.SIGNATURE, p.SUBSCRIBE, topic, p.SUB_HEADER.pack(draw(st.integers(0, 255)), draw(U64), draw(U32))]
    if kind == "C":
        return p.credit_frames(topic, draw(U32))
    if kind == "X":
        return [p.SIGNATURE, p.UNSUBSCRIBE, topic]
    if kind == "G":
        return p.consume_frames(topic, group, draw(U32))
    if kind == "Y":
        return p.group_ack_frames(topic, group, draw(st.lists(U64, max_size=5)))
    return [p.SIGNATURE, p.LEAVE, topic, group]


@st.composite
def mutated(draw) -> list[bytes]:
    frames = list(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "add", "replace", "flip", "truncate"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if how == "drop" and frames:
            del frames[i]
        elif how == "add":
            frames.insert(i, draw(st.binary(max_size=40)))
        elif how == "replace" and frames:
            frames[i] = draw(st.binary(max_size=60))
        elif how == "flip" and frames and frames[i]:
            at = draw(st.integers(0, len(frames[i]) - 1))
            frames[i] = frames[i][:at] + bytes([frames[i][at] ^ draw(st.integers(1, 255))]) + frames[i][at + 1 :]
        elif how == "truncate" and frames:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
    return frames


FRAMES = st.one_of(valid_frames(), mutated(), st.lists(st.binary(max_size=50), min_size=1, max_size=8))


def drain(sock) -> None:
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
        return response.status


def test_random_and_mutated_frames_never_stop_the_broker(procs):
    proc, url, http = start_broker("--max-topics=20", "--ack-timeout=1s")
    procs.append(proc)
    ctx = zmq.Context()
    peers = [dealer_socket(ctx, url, timeout_ms=10_000) for _ in range(3)]
    for peer in peers:
        peer.setsockopt(zmq.SNDTIMEO, 10_000)  # a broker that stopped reading fails the test, not hangs it
    honest = dealer_socket(ctx, url)
    try:
        assert publish(honest, 0, [0]) == p.ack_frames(PRODUCER, 0, 1, 0)  # so that reports for PRODUCER are kept
        started = time.monotonic()

        @settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(st.integers(0, len(peers) - 1), FRAMES), min_size=1, max_size=6))
        def feed(messages):
            for peer, frames in messages:
                if frames:
                    peers[peer].send_multipart(frames)
            for peer in peers:
                drain(peer)

        try:
            feed()
        except BaseException:  # e.g. zmq.Again: the broker stopped reading
            print(f"the broker (alive: {proc.popen.poll() is None}) said:\n{proc.output[-5000:]}")
            raise
        fed_for = time.monotonic() - started
        assert proc.popen.poll() is None, proc.output
        # everyone else is still served: a producer...
        other = b"\x07" * 16
        reply = publish(honest, 0, [1, 2, 3], producer=other)
        assert reply[1] == p.ACK and p.ACK_BODY.unpack(reply[2])[:3] == (other, 0, 3), reply
        # ...a subscriber...
        sub = dealer_socket(ctx, url)
        sub.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_BEGINNING, 0, 100))
        delivered = sub.recv_multipart()
        assert delivered[1] == p.DELIVER and p.DELIVER_HEADER.unpack(delivered[3])[0] == 0
        sub.close()
        # ...and a consumer of a new group, whose acknowledgment counts
        consumer = dealer_socket(ctx, url)
        consumer.send_multipart(p.consume_frames(b"telemetry", b"honest", 1))
        message = consumer.recv_multipart()
        assert message[1] == p.MESSAGE
        offset = p.MSG_HEADER.unpack(message[4])[0]
        consumer.send_multipart(p.group_ack_frames(b"telemetry", b"honest", [offset]))
        wait_until(
            lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["honest"]["committed"] > offset,
            timeout=10,
            message="the honest consumer's acknowledgment to count",
        )
        consumer.close()
        assert status(f"{http}/stats") == 200 and status(f"{http}/metrics") == 200 and status(f"{http}/healthz") == 200
        stats = get_json(f"{http}/stats")[1]
        assert sum(stats["bad_frames"].values()) > 0 and "internal_error" not in stats["bad_frames"], stats["bad_frames"]
        assert len(stats["topics"]) <= 20
        assert "Traceback" not in proc.output, proc.output
        print(f"fed {fed_for:.1f} s; bad frames by reason: {stats['bad_frames']}")
    finally:
        for sock in [*peers, honest]:
            sock.close()
        ctx.term()
