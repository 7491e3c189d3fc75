"""The hostile suite with memory measured (issue 15): a topic flood, stalled subscribers replaying a
large log, a consumer-group flood and huge reports, all at once against one broker. Its resident
memory (VmRSS, read from /proc) must stay under 512 MiB, the manifests' limit, and an honest
producer must keep being acknowledged throughout."""

import threading
import time

import orjson
import pytest
import zmq
from helpers import dealer_socket, get_json, publish, start_broker, wait_until

from broker import protocol as p

pytestmark = pytest.mark.timeout(300)

LIMIT_MIB = 512
ABORT_MIB = 700  # past this the broker is killed at once: a regression must not take the shared machine down
HONEST = b"\x0a" * 16


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssWatch(threading.Thread):
    """Samples a process's RSS every 50 ms; kills it past ABORT_MIB."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc = proc
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            if self.peak > ABORT_MIB:
                self.proc.kill()
                return


def stalled(ctx, url: str):
    """A DEALER that reads nothing: with a receive queue of one message and a tiny kernel buffer,
    what the broker sends it piles up in the broker."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(url)
    return sock


def test_the_broker_stays_small_and_serves_an_honest_producer_under_attack(procs, tmp_path):
    proc, url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    watch = RssWatch(proc)
    watch.start()
    ctx = zmq.Context()
    honest = dealer_socket(ctx, url)
    attacker = dealer_socket(ctx, url)
    sockets = [honest, attacker]
    seq = 0

    def still_served(phase: str) -> None:
        nonlocal seq
        started = time.monotonic()
        try:
            reply = publish(honest, seq, [seq, seq + 1], producer=HONEST)
        except zmq.Again:
            alive = "alive" if proc.popen.poll() is None else "dead"
            raise AssertionError(f"{phase}: no acknowledgment within 10 s (broker {alive}, peak RSS {watch.peak:.0f} MiB)") from None
        assert reply[1] == p.ACK and p.ACK_BODY.unpack(reply[2])[:3] == (HONEST, seq, 2), (phase, reply)
        assert time.monotonic() - started < 5, f"{phase}: the honest producer waited {time.monotonic() - started:.1f} s"
        seq += 2

    try:
        # a large log to replay: 80 batches of 1,000 messages of ~600 bytes (~48 MB)
        message = orjson.dumps({"pad": "x" * 580})
        body = b"\n".join([message] * 1000)
        for i in range(80):
            attacker.send_multipart(p.publish_frames(b"telemetry", b"\x0c" * 16, i * 1000, 1000, body))
            assert attacker.recv_multipart()[1] == p.ACK
        still_served("after the fill")

        # 1. a topic flood
        for i in range(3000):
            attacker.send_multipart(p.publish_frames(b"flood-%d" % i, b"\x0d" * 16, 0, 1, b"{}"))
        for _ in range(3000):
            attacker.recv_multipart()
        still_served("topic flood")

        # 2. stalled subscribers replaying the whole log, with all the credit they may have
        for _ in range(16):
            sub = stalled(ctx, url)
            sockets.append(sub)
            sub.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_BEGINNING, 0, 2**32 - 1))
        still_served("stalled subscribers")

        # 3. a consumer-group flood from one stalled member, each group with all the credit it may have
        member = stalled(ctx, url)
        sockets.append(member)
        for i in range(300):
            member.send_multipart(p.consume_frames(b"telemetry", b"g-%d" % i, 2**32 - 1))
        still_served("group flood")

        # 4. huge reports from producers that published
        reporters = [bytes([0x20 + i]) * 16 for i in range(8)]
        huge = orjson.dumps({"name": "n" * (32 << 20)})
        for producer in reporters:
            assert publish(attacker, 0, [0], producer=producer)[1] == p.ACK
            attacker.send_multipart(p.report_frames(b"telemetry", producer, huge))
        still_served("huge reports")

        # the attacks' frames are all handled (the 8 huge reports counted) before the last check
        wait_until(lambda: get_json(f"{http}/stats")[1]["bad_frames"].get("report_too_large", 0) >= 8, timeout=30, message="the huge reports refused")
        still_served("after the attacks")
        status, stats = get_json(f"{http}/stats")
        assert status == 200
    except zmq.Again:
        alive = "alive" if proc.popen.poll() is None else "dead (killed past ABORT_MIB?)"
        raise AssertionError(f"a reply did not come within 10 s: broker {alive}, peak RSS {watch.peak:.0f} MiB") from None
    finally:
        watch.stop.set()
        watch.join(5)
        for sock in sockets:
            sock.close()
        ctx.term()
    assert proc.popen.poll() is None, f"the broker died (peak RSS {watch.peak:.0f} MiB):\n{proc.output[-3000:]}"
    print(f"peak RSS {watch.peak:.0f} MiB; topics {len(stats['topics'])}; bad frames {stats['bad_frames']}")
    assert watch.peak < LIMIT_MIB, f"peak RSS {watch.peak:.0f} MiB"
    assert len(stats["topics"]) <= 100
    assert stats["bad_frames"].get("report_too_large") == len(reporters)
