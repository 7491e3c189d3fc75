"""Shutdown with readers connected: an SSE client, a live subscriber and a group consumer are told
that the broker is going away, and the process exits within seconds with code 0, standalone
(telemetry-broker serve) and embedded (telemetry-streamer)."""

import signal
import threading
import time
import urllib.request

import orjson
import zmq
from helpers import PRODUCER, Proc, dealer_socket, get_json, start_broker, wait_until

from broker import protocol as p

EXIT_WITHIN_S = 5.0


class Readers:
    """An SSE client (a thread reading the stream), a live ZeroMQ subscriber and a group consumer."""

    def __init__(self, zmq_url: str, http: str):
        self.sse_lines: list[str] = []
        self.sse_ended = threading.Event()
        self._sse = threading.Thread(target=self._read_sse, args=(f"{http}/topics/telemetry/stream",), daemon=True)
        self._sse.start()
        self.ctx = zmq.Context()
        self.subscriber = dealer_socket(self.ctx, zmq_url)
        self.subscriber.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 100))
        self.consumer = dealer_socket(self.ctx, zmq_url)
        self.consumer.send_multipart(p.consume_frames(b"telemetry", b"g", 10))
        stats = lambda: get_json(f"{http}/stats/telemetry")[1]  # noqa: E731
        wait_until(
            lambda: len(stats()["subscribers"]) == 2 and stats()["groups"].get("g", {}).get("consumers") == 1,
            message="the SSE client, the subscriber and the consumer",
        )

    def _read_sse(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            for raw in response:
                self.sse_lines.append(raw.decode().rstrip("\n"))
        self.sse_ended.set()

    @staticmethod
    def frames_until_closing(sock) -> list[bytes]:
        """Read past DELIVERs and MESSAGEs to the CLOSING frame (RCVTIMEO bounds each read)."""
        while (frames := sock.recv_multipart())[1] != p.CLOSING:
            pass
        return frames

    def close(self) -> None:
        self.subscriber.close()
        self.consumer.close()
        self.ctx.term()


def stop_and_check(proc: Proc, readers: Readers) -> None:
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    elapsed = time.monotonic() - started
    assert elapsed < EXIT_WITHIN_S, f"exit took {elapsed:.1f} s"
    assert readers.sse_ended.wait(5), "the SSE stream did not end"
    assert "event: shutdown" in readers.sse_lines
    assert readers.frames_until_closing(readers.subscriber) == [p.SIGNATURE, p.CLOSING, b"telemetry"]
    assert readers.frames_until_closing(readers.consumer) == [p.SIGNATURE, p.CLOSING, b"telemetry", b"g"]


def test_standalone_broker_tells_readers_and_exits_at_once(procs, tmp_path):
    proc, zmq_url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    readers = Readers(zmq_url, http)
    try:
        ctx = zmq.Context()
        producer = dealer_socket(ctx, zmq_url)
        body = b"\n".join(orjson.dumps({"v": v}) for v in range(3))
        producer.send_multipart(p.publish_frames(b"telemetry", PRODUCER, 0, 3, body))
        assert producer.recv_multipart()[1] == p.ACK
        producer.close()
        ctx.term()
        wait_until(lambda: any(line.startswith("data: ") for line in readers.sse_lines), message="the SSE client to get the messages")
        stop_and_check(proc, readers)
    finally:
        readers.close()
    assert "accepted telemetry=3" in proc.output


def test_embedded_broker_tells_readers_and_the_streamer_exits_at_once(procs, sample_csv):
    proc = Proc("streamer", f"--csv={sample_csv}", "--broker-port=0", "--http-port=0", "--rate=200")
    procs.append(proc)
    match = proc.wait_for_line(r"ZeroMQ (\S+), HTTP (http://\S+) ")
    readers = Readers(match.group(1).rstrip(","), match.group(2))
    try:
        wait_until(lambda: any(line.startswith("data: ") for line in readers.sse_lines), message="the SSE client to get messages")
        stop_and_check(proc, readers)
    finally:
        readers.close()
    assert "Drained:" in proc.output
