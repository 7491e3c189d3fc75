"""telemetry-broker serve, spoken to over its real sockets with the documented protocol."""

import os
import signal
import subprocess
import sys

import orjson
import pytest
from helpers import PRODUCER, Proc, broker_and_dealer, get_json, publish, wait_until

from broker import protocol as p


@pytest.fixture
def broker(procs):
    with broker_and_dealer(procs) as started:
        yield started


def test_acks_duplicates_and_gaps(broker):
    _, dealer, http, _ = broker
    assert publish(dealer, 10, [1, 2, 3]) == p.ack_frames(PRODUCER, 10, 3, 0)
    assert publish(dealer, 13, [4]) == p.ack_frames(PRODUCER, 13, 1, 3)
    assert publish(dealer, 10, [1, 2, 3]) == p.ack_frames(PRODUCER, 10, 3, p.DUPLICATE)  # a retry is not stored twice
    signature, command, body, code, reason = publish(dealer, 20, [9])
    assert (command, code) == (p.NACK, p.NACK_SEQUENCE)
    assert p.NACK_BODY.unpack(body) == (PRODUCER, 20, 1, 14)  # resend from 14
    assert publish(dealer, 12, [3, 4, 5]) == p.ack_frames(PRODUCER, 12, 3, 4)  # overlap: only 5 is new
    stats = get_json(f"{http}/stats/telemetry")[1]
    assert stats["messages"] == 5 and stats["duplicates"] == 5 and stats["next_offset"] == 5
    assert stats["producers"][PRODUCER.hex()]["next_seq"] == 15


def test_invalid_batches_are_refused_and_counted(broker):
    _, dealer, http, _ = broker
    dealer.send_multipart(p.publish_frames(b"telemetry", PRODUCER, 0, 5, b'{"a":1}\n{"a":2}'))
    reply = dealer.recv_multipart()
    assert reply[1] == p.NACK and reply[3] == p.NACK_INVALID and reply[4] == b"count_mismatch"
    reply = publish(dealer, 0, [1], topic=b"../etc")
    assert reply[3] == p.NACK_INVALID and reply[4] == b"bad_topic"
    stats = get_json(f"{http}/stats")[1]
    assert stats["bad_frames"] == {"count_mismatch": 1, "bad_topic": 1}
    assert stats["topics"]["telemetry"]["rejected"] == {"count_mismatch": 5}


def test_reports_fill_skipped_and_names(broker):
    _, dealer, http, _ = broker
    publish(dealer, 0, [1])
    dealer.send_multipart(p.report_frames(b"telemetry", PRODUCER, orjson.dumps({"name": "worker-0@test", "skipped": {"field_count": 3}})))
    stats = wait_until(lambda: (s := get_json(f"{http}/stats/telemetry")[1])["skipped"] and s)
    assert stats["skipped"] == {"field_count": 3}
    assert stats["producers"][PRODUCER.hex()]["name"] == "worker-0@test"


def test_http_answers_json_for_every_path(broker):
    _, _, http, _ = broker
    assert get_json(f"{http}/healthz") == (200, {"status": "ok"})
    assert get_json(f"{http}/readyz") == (200, {"status": "ready"})
    status, body = get_json(f"{http}/stats/nosuch")
    assert status == 404 and "nosuch" in body["error"]
    status, body = get_json(f"{http}/no/such/path")
    assert status == 404 and body["error"]
    status, stats = get_json(f"{http}/stats/telemetry")
    for key in ("topic", "messages", "bytes", "rate", "producers", "skipped", "subscribers", "uptime_s"):
        assert key in stats


def test_serve_stops_cleanly_on_sigterm(broker):
    proc, dealer, _, _ = broker
    publish(dealer, 0, [1, 2])
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert "accepted telemetry=2" in proc.output


def test_acks_of_back_to_back_batches_are_merged_per_burst():
    """In process, one burst: a producer's consecutive batches get one ACK covering them all; a
    gap, another producer or another peer gets its own reply, in order."""
    from broker.config import BrokerConfig
    from broker.server import Broker

    broker = Broker(BrokerConfig(topics=["telemetry"]))
    broker.registry.open()
    sent = []
    broker.transport.send = lambda identity, frames: sent.append((identity, frames))
    other = b"\x02" * 16

    def frame(identity, producer, first_seq, count):
        body = b"\n".join(b'{"v":%d}' % i for i in range(count))
        return [identity, *p.publish_frames(b"telemetry", producer, first_seq, count, body)]

    for frames in (
        frame(b"a", PRODUCER, 0, 10),
        frame(b"a", PRODUCER, 10, 5),
        frame(b"b", other, 0, 3),
        frame(b"a", PRODUCER, 15, 5),  # still joins the ACK of 0-14: nothing else went to "a" meanwhile
        frame(b"a", PRODUCER, 30, 1),  # a gap: refused
        frame(b"a", PRODUCER, 20, 2),  # after the refusal: a reply of its own
    ):
        broker.dispatcher.handle(frames)
    broker.ingest.commit()
    replies = [(identity, frames[1], p.ACK_BODY.unpack(frames[2]) if frames[1] == p.ACK else p.NACK_BODY.unpack(frames[2])) for identity, frames in sent]
    assert replies == [
        (b"a", p.ACK, (PRODUCER, 0, 20, 0)),
        (b"b", p.ACK, (other, 0, 3, 15)),
        (b"a", p.NACK, (PRODUCER, 30, 1, 20)),
        (b"a", p.ACK, (PRODUCER, 20, 2, 23)),
    ]
    assert broker.topics["telemetry"].acks == 3


def test_broker_raises_its_open_files_limit(procs):
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))  # noqa: E731
    proc = Proc("broker", "serve", "--port=0", "--http-port=0", preexec_fn=limit)
    procs.append(proc)
    proc.wait_for_line("Broker listening")
    assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE) == (4096, 4096)


_BATCH_CHURN = r"""
import resource, sys
from broker import host
if sys.argv[1] == "tuned":
    assert host.keep_freed_memory()
def churn(rounds):
    for i in range(rounds):
        batch = ((b"%d" % i).rjust(174, b"x") + b"\n") * 4000  # a received batch
        counted = batch.replace(b"\n", b"")  # and the copy its messages are counted with
        del counted, batch
churn(5)  # whatever the first rounds cost
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(100)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc")
def test_broker_keeps_freed_batch_memory_instead_of_faulting_it_in_again():
    """A batch-sized buffer freed and allocated again costs no page faults once tuned; by default
    glibc returns it to the OS and each new batch faults ~170 pages in."""
    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _BATCH_CHURN, mode], capture_output=True, text=True, check=True, timeout=60)
        faults[mode] = int(out.stdout)
    assert faults["default"] > 100 * 100  # about 170 per round
    assert faults["tuned"] < 100  # none per round
