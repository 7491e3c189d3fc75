"""Fault injection against the real processes: kill -9, SIGSTOP, restarts, garbage. Each case is bounded."""

import os
import signal
import subprocess
import sys
import time

from helpers import ROOT, Proc, alive, free_port, get_json, start_broker, start_streamer, start_streamer_to, summary, wait_until, workers_of


def unacknowledged(http: str) -> float:
    """The streamer's own view (its workers report once a second), from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(s.value for f in families if f.name == "telemetry_worker_unacknowledged" for s in f.samples)


def messages(http: str) -> int:
    return get_json(f"{http}/stats/telemetry")[1]["messages"]


def test_killed_worker_is_replaced_and_the_rate_recovers(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=100")
    procs.append(proc)
    before = wait_until(lambda: len(w := workers_of(proc.pid)) == 2 and w, message="2 workers")
    wait_until(lambda: messages(http) >= 100)
    os.kill(before[0], signal.SIGKILL)
    proc.wait_for_line("Worker 0 exited unexpectedly .*restarting")
    wait_until(lambda: len(w := workers_of(proc.pid)) == 2 and set(w) != set(before), timeout=30, message="a replacement worker")
    # the replacement publishes: the total rate is back to about 2 x 100/s
    wait_until(lambda: len(get_json(f"{http}/stats/telemetry")[1]["producers"]) == 3, message="the replacement's producer id")
    start, t0 = messages(http), time.monotonic()
    time.sleep(2.0)  # a rate is measured over time
    rate = (messages(http) - start) / (time.monotonic() - t0)
    assert 150 <= rate <= 250, rate
    assert not alive(before[0])
    workers = get_json(f"{http}/stats/telemetry")[1]["workers"]  # restarts are in /stats, per worker
    assert workers["0"]["restarts"] == 1 and workers["0"]["running"] and workers["0"]["pid"] not in before
    assert workers["1"]["restarts"] == 0 and workers["1"]["pid"] in before
    assert get_json(f"{http}/stats")[1]["workers"]["0"]["restarts"] == 1
    proc.signal(signal.SIGTERM)
    proc.wait()
    figures = summary(proc.output)
    assert figures["broker_accepted"] >= figures["published"] > 0


def test_broker_killed_and_restarted_stream_continues_exactly_once(procs, sample_csv, tmp_path):
    """kill -9 of the standalone broker under an unthrottled stream with --fsync=always, restart on
    the same port and directory, keep streaming, drain: every message a worker counted as
    published is in the log exactly once."""
    from broker.segmentlog import read_batches

    port = free_port()
    args = (f"--port={port}", "--http-port=0", "--persistence", f"--persistence-dir={tmp_path}", "--fsync=always")
    broker = Proc("broker", "serve", *args)
    procs.append(broker)
    http = broker.wait_for_line(r"HTTP (http://\S+) ").group(1)
    streamer = Proc(
        "streamer", f"--csv={sample_csv}", f"--broker-url=tcp://127.0.0.1:{port}", "--workers=2", "--rate=0", "--http-port=0", "--shutdown-timeout=20"
    )
    procs.append(streamer)
    wait_until(lambda: messages(http) >= 20_000 and len(get_json(f"{http}/stats/telemetry")[1]["producers"]) == 2, message="20,000 messages, from both workers")
    broker.popen.send_signal(signal.SIGKILL)
    broker.wait()
    broker = Proc("broker", "serve", *args)  # same port, same directory
    procs.append(broker)
    http = broker.wait_for_line(r"HTTP (http://\S+) ").group(1)
    recovered = get_json(f"{http}/stats/telemetry")[1]["next_offset"]
    wait_until(lambda: messages(http) >= 20_000, timeout=60, message="the streamer to continue into the restarted broker")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait(timeout=60) == 0, streamer.output
    published = summary(streamer.output)["published"]
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    # checked batch by batch (a batch's records are contiguous by construction): offsets from 0
    # without a gap, each producer's sequence numbers without a gap or an overlap
    next_offset, next_seq = 0, {}
    for batch in read_batches(str(tmp_path / "telemetry")):
        assert batch.base_offset == next_offset
        assert batch.base_seq == next_seq.get(batch.producer, batch.base_seq)
        next_offset, next_seq[batch.producer] = batch.next_offset, batch.base_seq + batch.count
    assert recovered > 0 and next_offset >= recovered + 20_000
    assert len(next_seq) == 2  # the same two workers (producer ids) before and after the restart
    assert next_offset == published  # every acknowledged message, exactly once


def test_stopped_broker_does_not_hang_the_drain(procs, sample_csv):
    broker, zmq_url, http = start_broker()
    procs.append(broker)
    streamer, own_http = start_streamer_to(zmq_url, sample_csv, "--rate=100", "--shutdown-timeout=2")
    procs.append(streamer)
    wait_until(lambda: messages(http) >= 20)
    broker.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: unacknowledged(own_http) > 0, message="batches the stopped broker cannot acknowledge")
        workers = get_json(f"{own_http}/stats")[1]["workers"]  # the streamer's own /stats
        assert workers["0"]["running"] and workers["0"]["unacknowledged"] > 0 and workers["0"]["restarts"] == 0
        started = time.monotonic()
        streamer.signal(signal.SIGTERM)
        code = streamer.wait(timeout=30)
        assert time.monotonic() - started < 2 + 5 + 3  # the shutdown timeout plus the drain's grace
        assert code == 1 and summary(streamer.output)["unacknowledged"] > 0
    finally:
        broker.signal(signal.SIGCONT)


def test_publisher_carries_on_when_the_broker_lost_acknowledged_messages(procs, tmp_path, caplog):
    """A broker whose log was cut back (a crash under --fsync=interval loses the unsynced tail)
    asks for a sequence number the publisher already saw acknowledged: the publisher counts the
    loss, takes a new producer id and continues; nothing it still holds is lost or duplicated."""
    import asyncio
    import shutil

    import orjson

    from broker.client import Publisher

    port = free_port()
    data, snapshot = tmp_path / "mq", tmp_path / "snapshot"
    args = (f"--port={port}", "--http-port=0", "--persistence", f"--persistence-dir={data}", "--fsync=always")
    broker = Proc("broker", "serve", *args)
    procs.append(broker)
    broker.wait_for_line("Broker listening")

    def body(values):
        return b"\n".join(orjson.dumps({"v": v}) for v in values)

    async def scenario():
        nonlocal broker
        pub = Publisher(f"tcp://127.0.0.1:{port}", "telemetry", ack_timeout=0.5)
        await pub.start()
        try:
            for first in range(0, 100, 10):
                await pub.publish(body(range(first, first + 10)), 10)
            assert await pub.flush(20)
            shutil.copytree(data, snapshot)  # the log as it will be "after the crash"
            for first in range(100, 200, 10):
                await pub.publish(body(range(first, first + 10)), 10)
            assert await pub.flush(20) and pub.published == 200
            broker.popen.send_signal(signal.SIGKILL)
            broker.wait()
            shutil.rmtree(data)
            shutil.copytree(snapshot, data)  # messages 100-199 were acknowledged, and are gone
            broker = Proc("broker", "serve", *args)
            procs.append(broker)
            broker.wait_for_line("Broker listening")
            for first in range(200, 250, 10):
                await pub.publish(body(range(first, first + 10)), 10)
            assert await pub.flush(30), "the publisher stalled on a gap that cannot be filled"
            return pub.published, pub.lost_by_broker
        finally:
            await pub.close()

    published, lost = asyncio.run(scenario())
    assert (published, lost) == (250, 100)
    assert "lost 100 messages it had acknowledged (sequence 100 to 199" in caplog.text
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    dump = subprocess.run([sys.executable, "-m", "broker", "dump", f"--persistence-dir={data}", "--meta"], cwd=ROOT, capture_output=True, timeout=60)
    records = [orjson.loads(line) for line in dump.stdout.splitlines()]
    assert [r["message"]["v"] for r in records] == [*range(100), *range(200, 250)]  # the rest once each, in order
    assert len({r["producer"] for r in records}) == 2


def test_a_crash_looping_worker_is_given_up_and_the_others_go_on(procs, sample_csv):
    """A worker that dies again and again (here: killed each time it is replaced) is given up after
    CRASH_LOOP_RESTARTS restarts within the window, and not restarted again; the other worker
    keeps streaming, and the exit code says a worker was lost. The real command, with its restart
    backoff (1 s doubling) shortened so that the loop takes seconds instead of half a minute."""
    from streamer.supervisor import CRASH_LOOP_RESTARTS

    driver = "import streamer.supervisor as s; s.RESTART_MIN_S = s.RESTART_MAX_S = 0.05; from streamer.cli import main; main()"
    proc = Proc(argv=[sys.executable, "-c", driver, f"--csv={sample_csv}", "--broker-port=0", "--http-port=0", "--workers=2", "--rate=100"])
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    killed: set[int] = set()

    def worker(index: str) -> dict:
        return get_json(f"{http}/stats/telemetry")[1]["workers"][index]

    for _ in range(CRASH_LOOP_RESTARTS + 1):
        pid = wait_until(lambda: (w := worker("0"))["running"] and w["pid"] not in killed and w["pid"], message="worker 0 (re)started")
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    proc.wait_for_line(r"Worker 0 exited unexpectedly .* giving up on it")
    given_up = worker("0")
    assert given_up["given_up"] and given_up["restarts"] == CRASH_LOOP_RESTARTS
    published = worker("1")["published"]
    wait_until(lambda: worker("1")["published"] >= published + 100, message="worker 1 to go on")  # >= 1 s: 20 restart delays
    assert not worker("0")["running"] and worker("0")["pid"] is None and worker("1")["restarts"] == 0
    assert len(workers_of(proc.pid)) == 1
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 1, proc.output


def test_a_restarted_workers_slot_keeps_its_counts(procs, sample_csv):
    """Worker 0 exits (SIGTERM to it alone: it flushes and reports its final counts) and is
    replaced; at the end its slot's published count is what all of its processes published, as
    the broker counted it per producer."""
    broker, zmq_url, http = start_broker()
    procs.append(broker)
    streamer, own_http = start_streamer_to(zmq_url, sample_csv, "--workers=2", "--rate=100")
    procs.append(streamer)

    def worker0() -> dict:
        return get_json(f"{own_http}/stats")[1]["workers"]["0"]

    first = wait_until(lambda: (w := worker0())["published"] >= 100 and w["pid"], message="worker 0 to publish 100")
    os.kill(first, signal.SIGTERM)
    wait_until(lambda: (w := worker0())["restarts"] == 1 and w["running"] and w["pid"] != first, timeout=30, message="worker 0 replaced")
    wait_until(lambda: len(get_json(f"{http}/stats/telemetry")[1]["producers"]) == 3, message="the replacement publishing")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0, streamer.output
    producers = get_json(f"{http}/stats/telemetry")[1]["producers"].values()
    from_worker_0 = [p["messages"] for p in producers if p["name"].startswith("worker-0@")]
    assert len(from_worker_0) == 2 and min(from_worker_0) > 0
    assert summary(streamer.output)["workers"][0] == sum(from_worker_0)
