"""Subscribers: fan-out in order, a stalled one costs producers nothing, replay, SSE, tail."""

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request

import orjson
import pytest
import zmq
from helpers import ROOT, Proc, get_json, publish_numbered, start_broker, wait_until

from broker import protocol as p
from broker.client import BlockingSubscriber, Subscriber


@pytest.fixture
def broker(procs, tmp_path, request):
    args = getattr(request, "param", ())
    proc, zmq_url, http = start_broker(*args)
    procs.append(proc)
    return proc, zmq_url, http


async def collect(sub: Subscriber, count: int, timeout: float = 30) -> list[tuple[int, int]]:
    got = []

    async def run():
        async for offset, message in sub:
            got.append((offset, orjson.loads(message)["i"]))
            if len(got) == count:
                return

    await asyncio.wait_for(run(), timeout)
    return got


def test_fan_out_to_several_subscribers_in_order(broker):
    _, url, http = broker

    async def scenario():
        subs = [Subscriber(url, "telemetry") for _ in range(3)]
        for sub in subs:
            await sub.start()
        await asyncio.sleep(0)
        wait_until(lambda: len(get_json(f"{http}/stats/telemetry")[1]["subscribers"]) == 3, message="3 subscribers")
        results = asyncio.gather(*(collect(sub, 5000) for sub in subs))
        await publish_numbered(url, 5000)
        received = await results
        for sub in subs:
            await sub.close()
        return received

    for received in asyncio.run(scenario()):
        assert received == [(i, i) for i in range(5000)]
    stats = get_json(f"{http}/stats/telemetry")[1]
    assert sorted(s["delivered"] for s in stats["subscribers"].values())[-3:] == [5000] * 3 or all(
        s["delivered"] == 5000 for s in stats["subscribers"].values()
    )


def test_a_stalled_subscriber_never_slows_producers_and_its_drops_are_counted(broker):
    _, url, http = broker
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.DEALER)  # subscribes, then never reads
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.connect(url)
    stalled.send_multipart(p.subscribe_frames(b"telemetry", credit=10))  # and never grants more
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the subscriber")
    started = time.monotonic()
    pub = asyncio.run(publish_numbered(url, 200_000, batch=1000, pad=200))  # 40 MB: far past any socket buffer
    elapsed = time.monotonic() - started
    assert pub.published == 200_000 and pub.resends == 0  # every batch acknowledged on the first try
    assert elapsed < 60
    sub = next(iter(get_json(f"{http}/stats/telemetry")[1]["subscribers"].values()))
    assert sub["dropped"] > 0 and sub["delivered"] + sub["dropped"] == 200_000
    assert sub["delivered"] == 10 * 1000  # exactly its credit: the queue bound does not depend on buffers
    # reading again and granting credit, it learns of every message it lost
    frames = []
    while stalled.poll(1000):
        frames.append(stalled.recv_multipart())
    stalled.send_multipart(p.credit_frames(b"telemetry", 10))
    asyncio.run(publish_numbered(url, 1))
    assert stalled.poll(10_000)
    frames.append(stalled.recv_multipart())
    headers = [p.DELIVER_HEADER.unpack(f[3]) for f in frames]
    assert sum(missed for _, _, missed, *_ in headers) == sub["dropped"]
    assert headers[-1][0] == 200_000  # the newest message, after the gap
    offsets = [first for first, *_ in headers]
    assert offsets == sorted(offsets)  # what it did receive is in order
    stalled.close()
    ctx.term()


@pytest.mark.parametrize("broker", [(), ("--persistence", "--persistence-dir=PLACEHOLDER")], indirect=False, ids=["memory", "log"])
def test_replay_from_offset_from_beginning_and_from_time(procs, tmp_path, broker):
    args = [a.replace("PLACEHOLDER", str(tmp_path)) for a in broker]
    proc, url, http = start_broker(*args)
    procs.append(proc)
    asyncio.run(publish_numbered(url, 3000))
    middle = time.time_ns()
    time.sleep(0.01)  # a clear gap in receive times between the two halves
    asyncio.run(publish_numbered(url, 3000, topic="telemetry"))

    async def replays():
        from_offset = Subscriber(url, "telemetry", from_offset=2500)
        await from_offset.start()
        a = await collect(from_offset, 1000)
        from_start = Subscriber(url, "telemetry", from_beginning=True)
        await from_start.start()
        b = await collect(from_start, 6000)
        from_time = Subscriber(url, "telemetry", from_time_ns=middle)
        await from_time.start()
        c = await collect(from_time, 10)
        for sub in (from_offset, from_start, from_time):
            await sub.close()
        return a, b, c

    a, b, c = asyncio.run(replays())
    assert [o for o, _ in a] == list(range(2500, 3500))
    assert [o for o, _ in b] == list(range(6000))
    assert c[0][0] == 3000  # the first message received after `middle`


def test_sse_stream_through_a_real_http_client(broker):
    _, url, http = broker
    lines = []

    def read_stream():
        with urllib.request.urlopen(f"{http}/topics/telemetry/stream", timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    lines.append(json.loads(line[6:]))
                if len(lines) == 300:
                    return

    import threading

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the SSE subscriber")
    asyncio.run(publish_numbered(url, 300, batch=30))
    reader.join(30)
    assert [m["i"] for m in lines] == list(range(300))
    assert get_json(f"{http}/topics/nope/stream")[0] == 404


def test_tail_in_a_pipe_with_meta_and_count(broker, tmp_path):
    _, url, _ = broker
    asyncio.run(publish_numbered(url, 50))
    result = subprocess.run(
        f"{sys.executable} -m broker tail --broker-url={url} --from-offset=10 --meta --count=5",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["offset"] for r in records] == [10, 11, 12, 13, 14]
    assert [r["message"]["i"] for r in records] == [10, 11, 12, 13, 14]
    assert all(len(r["producer"]) == 32 and r["received"].endswith("Z") for r in records)
    piped = subprocess.run(
        f"{sys.executable} -m broker tail --broker-url={url} --from-beginning | head -n 2", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert len(piped.stdout.splitlines()) == 2 and "Traceback" not in piped.stderr


def test_tail_exits_cleanly_on_ctrl_c(broker):
    _, url, http = broker
    tail = Proc("broker", "tail", f"--broker-url={url}")
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="tail to subscribe")
    tail.signal(signal.SIGINT)
    assert tail.wait(timeout=15) == 0
    assert "Traceback" not in tail.output


def test_blocking_subscriber(broker):
    _, url, _ = broker
    asyncio.run(publish_numbered(url, 20))
    with BlockingSubscriber(url, "telemetry", from_beginning=True) as sub:
        got = [next(sub) for _ in range(20)]
    assert [offset for offset, _ in got] == list(range(20))


class SSEReader:
    """A real HTTP client of the SSE stream (http.client), parsing events as the standard says."""

    def __init__(self, base_url: str, topic: str = "telemetry", last_event_id: str | None = None):
        import http.client
        import urllib.parse

        url = urllib.parse.urlsplit(base_url)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", f"/topics/{topic}/stream", headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.retry = None

    def events(self):
        """(event type, id, data) per event; the id is None when the event carried none."""
        kind, event_id, data = "message", None, []
        while True:
            line = self.response.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if not line:
                if data:
                    yield kind, event_id, "\n".join(data)
                kind, event_id, data = "message", None, []
            elif line.startswith("retry: "):
                self.retry = int(line[7:])
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])

    def take(self, count: int) -> list[tuple[str, int | None, str]]:
        got = []
        for event in self.events():
            got.append(event)
            if sum(1 for e in got if e[0] == "message") == count:
                break
        return got

    def close(self) -> None:
        self.conn.close()


def test_sse_resumes_after_last_event_id_without_gap_or_duplicate(broker):
    """Each event's id is its message's offset; a reader that disconnects and reconnects with
    Last-Event-ID gets exactly the messages after it (from the in-memory window), then live ones."""
    _, url, http = broker
    asyncio.run(publish_numbered(url, 100, batch=30))
    first = SSEReader(http, last_event_id="-1")  # not an offset: read live from now
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the SSE subscriber")
    asyncio.run(publish_numbered(url, 50, batch=7))  # offsets 100..149
    events = first.take(50)
    assert first.retry == 2000
    assert [(kind, event_id, json.loads(data)["i"]) for kind, event_id, data in events] == [("message", 100 + i, i) for i in range(50)]
    first.close()
    wait_until(lambda: not get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the first reader to leave")

    asyncio.run(publish_numbered(url, 60, batch=9))  # offsets 150..209 while nobody reads
    again = SSEReader(http, last_event_id="129")  # it says it saw up to 129 (say the last 20 were lost in transit)
    backlog = again.take(80)
    assert [e[1] for e in backlog] == list(range(130, 210))
    assert [e[0] for e in backlog] == ["message"] * 80
    asyncio.run(publish_numbered(url, 25, batch=10))  # and then live, continuing at 210
    live = again.take(25)
    assert [e[1] for e in live] == list(range(210, 235))
    again.close()

    caught_up = SSEReader(http, last_event_id="234")  # nothing missed: straight to live
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the third reader")
    asyncio.run(publish_numbered(url, 5, batch=5))
    assert [e[:2] for e in caught_up.take(5)] == [("message", o) for o in range(235, 240)]
    caught_up.close()


def test_sse_says_missed_when_the_offset_is_no_longer_held(procs, tmp_path):
    """Retention removed the start of the log: a reconnect from offset 0 gets a `missed` event
    with the count of what is gone, then everything from the oldest message held. An offset past
    the topic's end (a broker restarted without its log) gets `missed` with a null count."""
    proc, url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}", "--segment-bytes=4096", "--retention-bytes=16KiB", "--fsync=never")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 3000, batch=50, pad=40))
    oldest = wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["persistence"]["first_offset"], message="retention to remove a segment")
    reader = SSEReader(http, last_event_id="0")
    events = reader.take(3000 - oldest)
    reader.close()
    kind, event_id, data = events[0]
    assert kind == "missed" and event_id is None
    assert json.loads(data) == {"missed": oldest - 1, "reason": "no longer held"}
    assert [e[1] for e in events[1:]] == list(range(oldest, 3000))

    ahead = SSEReader(http, last_event_id="999999")
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the reader")
    asyncio.run(publish_numbered(url, 3))  # a new producer: offsets 3000..3002
    events = ahead.take(3)
    ahead.close()
    assert events[0][0] == "missed" and json.loads(events[0][2])["missed"] is None
    assert [e[1] for e in events[1:]] == [3000, 3001, 3002]


def test_sse_resume_of_a_long_backlog_loses_nothing_published_meanwhile(procs):
    """While a reconnected reader is still being sent its backlog (it reads nothing yet, so the
    catch-up waits on the socket), new batches overflow its live queue (--subscriber-queue=1):
    the catch-up sends them from the topic, and the reader gets every offset once, in order."""
    proc, url, http = start_broker("--subscriber-queue=1")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 4000, batch=100, pad=2000))  # ~8 MB: more than the socket buffers hold
    reader = SSEReader(http, last_event_id="0")
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the reader")
    asyncio.run(publish_numbered(url, 2000, batch=10))  # 200 batches while the catch-up is blocked
    (sub,) = get_json(f"{http}/stats/telemetry")[1]["subscribers"].values()
    assert sub["dropped"] > 0  # the live queue did overflow
    events = reader.take(5999)
    reader.close()
    assert [e[0] for e in events] == ["message"] * 5999
    assert [e[1] for e in events] == list(range(1, 6000))


@pytest.mark.parametrize("broker", [("--subscriber-queue=1",)], indirect=True)
def test_sse_client_that_fell_behind_is_told_what_it_missed(broker):
    _, url, http = broker
    events: list[tuple[str, dict]] = []

    def read_stream():
        event = "message"
        with urllib.request.urlopen(f"{http}/topics/telemetry/stream", timeout=30) as response:
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:])))
                    event = "message"

    import threading

    threading.Thread(target=read_stream, daemon=True).start()
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"], message="the SSE subscriber")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(url)
    try:
        for seq in range(200):  # back to back: bursts of batches overflow a queue of one
            dealer.send_multipart(p.publish_frames(b"telemetry", b"\x07" * 16, seq, 1, b'{"i":%d}' % seq))
        sse = lambda: next(iter(get_json(f"{http}/stats/telemetry")[1]["subscribers"].values()))  # noqa: E731
        dropped = wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] == 200 and sse()["dropped"], message="drops")
        wait_until(lambda: sse()["delivered"] + dropped == 200, message="the queue to empty")
        dealer.send_multipart(p.publish_frames(b"telemetry", b"\x07" * 16, 200, 1, b'{"i":200}'))  # the next delivery says what was missed
        wait_until(lambda: events and events[-1] == ("message", {"i": 200}), message="the last message")
    finally:
        dealer.close()
        ctx.term()
    assert sum(data["missed"] for event, data in events if event == "missed") == dropped
    assert len([e for e in events if e[0] == "message"]) + dropped == 201
