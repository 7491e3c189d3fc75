"""telemetry-streamer end to end: real processes, free ports, real signals, stats over HTTP."""

import os
import signal
import subprocess
import time
from collections import Counter

import orjson
import pytest
from helpers import (
    Proc,
    alive,
    children_of,
    fake_broker,
    find_tool,
    get_json,
    start_broker,
    start_streamer,
    start_streamer_to,
    summary,
    topic_stats,
    wait_until,
    workers_of,
)

from broker import protocol as p
from streamer.supervisor import SIGNAL_DEBOUNCE_S


def worker_pids(proc: Proc, count: int) -> list[int]:
    return wait_until(lambda: len(pids := workers_of(proc.pid)) >= count and pids, message=f"{count} workers")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_nothing_is_lost(procs, sample_csv, signum):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=200")
    procs.append(proc)
    pids = worker_pids(proc, 2)
    body = wait_until(lambda: (b := topic_stats(http))["messages"] >= 100 and len(b["producers"]) == 2 and b, message="100 messages, from both workers")
    assert len(body["producers"]) == 2 and body["uptime_s"] > 0
    proc.signal(signum)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= body["messages"]
    assert figures["unacknowledged"] == 0
    assert sum(figures["workers"].values()) == figures["published"] and set(figures["workers"]) == {0, 1}
    assert proc.lines[-1] == figures["line"]  # the summary is the last line
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5, message="the workers gone")


def test_a_stop_while_workers_are_still_starting_is_not_lost(procs, sample_csv):
    """SIGTERM the moment the workers are being started: a worker that gets the supervisor's
    SIGTERM before its handler is set up still drains (the signal waits, blocked, until then)."""
    proc = Proc("streamer", f"--csv={sample_csv}", "--broker-port=0", "--http-port=0", "--workers=4", "--rate=1")
    procs.append(proc)
    proc.wait_for_line("Starting 4 workers")
    proc.signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=30) == 0, proc.output
    assert time.monotonic() - started < 10, proc.output  # not the drain deadline's kill (15 s)
    assert "Forced exit" not in proc.output and summary(proc.output)["unacknowledged"] == 0


def test_a_stop_sent_to_the_whole_process_group_drains_exactly(procs, sample_csv):
    """`timeout`, systemd and `kill -TERM -PGID` signal every process of the group at once: the
    workers and their fork server too. Every worker must still drain and report."""
    proc = Proc("streamer", f"--csv={sample_csv}", "--broker-port=0", "--http-port=0", "--workers=3", "--rate=100", preexec_fn=os.setpgrp)
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    wait_until(lambda: len(topic_stats(http)["producers"]) == 3, message="3 workers publishing")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] > 0, figures["line"]
    assert set(figures["workers"]) == {0, 1, 2} and all(figures["workers"].values()), figures["line"]
    assert proc.output.count(" stopped: published=") == 3, proc.output


def test_unthrottled_two_workers_drain_exactly(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=0")
    procs.append(proc)
    wait_until(lambda: (b := topic_stats(http))["messages"] >= 20_000 and len(b["producers"]) == 2, message="20,000 messages from 2 workers")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= 20_000
    assert all(count > 0 for count in figures["workers"].values())
    assert "Reached end of CSV, restarting from beginning" in proc.output
    assert "broker ipc://" in proc.output  # the embedded broker's workers use the Unix socket


def thread_policies(pid: int) -> dict[str, set[int]]:
    """Scheduling policy of each of a process's threads, by thread name."""
    policies: dict[str, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            policies.setdefault(name, set()).add(os.sched_getscheduler(int(tid)))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return policies


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_workers_run_as_batch_work_and_the_broker_does_not(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=100")
    procs.append(proc)
    wait_until(lambda: len(topic_stats(http)["producers"]) == 2, message="2 workers publishing")
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # every thread, ZeroMQ's I/O thread included, inherits the policy
        policies = thread_policies(pid)
        assert any(name.startswith("ZMQbg/IO") for name in policies), policies
        assert set().union(*policies.values()) == {os.SCHED_BATCH}, policies
    assert set().union(*thread_policies(proc.pid).values()) == {os.SCHED_OTHER}  # the broker answers at once


def test_workers_die_with_a_killed_parent(procs, sample_csv):
    proc, _ = start_streamer(sample_csv, "--workers=3", "--rate=5")
    procs.append(proc)
    pids = worker_pids(proc, 3) + children_of(proc.pid)  # the workers and their fork server
    proc.popen.kill()
    proc.wait()
    # the fork server lives while a worker holds its lifeline, and the workers' parent is the fork
    # server: each watches the streamer itself (a pidfd), or they all stayed behind for good
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, message="workers and fork server to exit after the parent's SIGKILL")


def test_bad_rows_are_counted_in_stats_and_the_stream_goes_on(procs, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"gpu_id,active\n0,true\n1\n2,\xff\n3,false\n")
    proc, http = start_streamer(str(path), "--rate=100")
    procs.append(proc)
    body = wait_until(lambda: (b := topic_stats(http))["messages"] >= 20 and b["skipped"] and b, message="messages and skip counts")
    assert set(body["skipped"]) == {"field_count", "invalid_utf8"}
    assert "skipped line 3" in proc.output and "skipped line 4" in proc.output
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output


def test_external_broker(procs, sample_csv):
    broker, zmq_url, http = start_broker()
    procs.append(broker)
    streamer, _ = start_streamer_to(zmq_url, sample_csv, "--workers=2", "--rate=100")
    procs.append(streamer)
    wait_until(lambda: topic_stats(http)["messages"] >= 50, message="50 messages at the external broker")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0, streamer.output
    figures = summary(streamer.output)
    assert "broker_accepted" not in figures  # not the streamer's to know
    assert topic_stats(http)["messages"] == figures["published"]
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    assert f"telemetry={figures['published']}" in broker.output


def test_messages_on_the_wire(procs, sample_csv):
    """A test-side ROUTER plays the broker: what the workers send is the documented protocol."""
    with fake_broker() as (router, url):
        streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={url}", "--http-port=0", "--rate=50", "--column-type=active=bool")
        procs.append(streamer)
        assert router.poll(20_000), streamer.output
        identity, signature, command, topic, header, body = router.recv_multipart()
        assert (signature, command, topic) == (p.SIGNATURE, p.PUBLISH, b"telemetry")
        producer, first_seq, count = p.PUB_HEADER.unpack(header)
        messages = [orjson.loads(line) for line in body.split(b"\n")]
        assert len(messages) == count >= 1
        assert messages[0]["fields"] == {"gpu_id": 0, "utilization": 0.5, "temperature": 40, "memory_used": 0, "hostname": "node-0", "active": False}
        router.send_multipart([identity, *p.ack_frames(producer, first_seq, count, 0)])
        streamer.signal(signal.SIGTERM)
        # the worker drains: everything after the first batch is also sent; acknowledge it all
        deadline = time.monotonic() + 20
        while streamer.popen.poll() is None and time.monotonic() < deadline:
            if router.poll(100):
                frames = router.recv_multipart()
                if frames[2] == p.PUBLISH:
                    producer, seq, n = p.PUB_HEADER.unpack(frames[4])
                    router.send_multipart([frames[0], *p.ack_frames(producer, seq, n, 0)])
        assert streamer.wait() == 0, streamer.output


def test_batches_stay_within_the_batch_byte_cap(procs, sample_csv):
    """Unthrottled, a worker batches thousands of rows; with a small --max-message-bytes its
    batches are cut to batch_bytes() (64 KiB here), never one frame of hundreds of KB."""
    cap = p.batch_bytes(256)
    sizes = []
    with fake_broker() as (router, url):
        streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={url}", "--http-port=0", "--rate=0", "--max-message-bytes=256")
        procs.append(streamer)
        deadline, stopping = time.monotonic() + 30, False
        while streamer.popen.poll() is None and time.monotonic() < deadline:  # acknowledge everything, the drain too
            if len(sizes) >= 50 and not stopping:
                streamer.signal(signal.SIGTERM)
                stopping = True
            if router.poll(100):
                frames = router.recv_multipart()
                if frames[2] == p.PUBLISH:
                    producer, seq, n = p.PUB_HEADER.unpack(frames[4])
                    sizes.append((len(frames[5]), n))
                    router.send_multipart([frames[0], *p.ack_frames(producer, seq, n, 0)])
        assert streamer.wait() == 0, streamer.output
    assert len(sizes) >= 50, streamer.output
    assert max(size for size, _ in sizes) <= cap == 64 << 10
    assert max(n for _, n in sizes) > 100  # still batches, not single messages


def test_hung_broker_does_not_hang_the_drain_and_a_second_signal_forces(procs, sample_csv):
    with fake_broker() as (router, url):  # accepts, never acknowledges
        proc = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={url}", "--http-port=0", "--rate=50", "--shutdown-timeout=1")
        procs.append(proc)
        assert router.poll(20_000)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1  # messages left unacknowledged: not a clean exit
        assert summary(proc.output)["unacknowledged"] > 0
        assert "shutdown timeout" in proc.output
        while router.poll(0):  # what the first streamer sent
            router.recv_multipart()

        proc = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={url}", "--http-port=0", "--rate=50", "--shutdown-timeout=60")
        procs.append(proc)
        proc.wait_for_line("Worker 0 started")
        assert router.poll(20_000)  # something is sent, and will never be acknowledged
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("Shutdown requested")
        time.sleep(SIGNAL_DEBOUNCE_S + 0.1)  # sooner, it counts as the same request
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1, proc.output
        assert time.monotonic() - started < 15
        assert "Forced exit:" in proc.output


@pytest.mark.skipif(find_tool("unshare") is None or os.geteuid() != 0, reason="needs unshare and root for a PID namespace")
def test_drains_as_pid_1(procs, sample_csv, tmp_path):
    """As in a container: the streamer is PID 1 of its own PID namespace, SIGTERM comes from outside."""
    import sys

    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"PID namespaces unavailable: {probe.stderr.decode().strip()}")
    proc = Proc(
        argv=[
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-m",
            "streamer",
            f"--csv={sample_csv}",
            "--broker-port=0",
            "--http-port=0",
            "--workers=2",
            "--rate=100",
        ]
    )
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    wait_until(lambda: topic_stats(http)["messages"] >= 50)
    init = wait_until(lambda: children_of(proc.pid), message="the namespace's PID 1")[0]
    with open(f"/proc/{init}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
    assert nspid[-1] == "1", nspid  # PID 1 in its own namespace
    os.kill(init, signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= 50


def test_workers_publish_to_the_topic_given(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=100", "--topic=gpu.metrics-1")
    procs.append(proc)
    body = wait_until(
        lambda: (b := topic_stats(http, "gpu.metrics-1"))["messages"] >= 50 and len(b["producers"]) == 2 and b, message="both workers on the topic"
    )
    assert body["topic"] == "gpu.metrics-1"
    assert get_json(f"{http}/stats/telemetry")[0] == 404  # nothing went to the default topic
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= 50


def test_a_second_stop_within_the_debounce_is_the_same_request(procs, sample_csv):
    """`timeout` and process managers signal the process and then its group, and a terminal's
    Ctrl+C can meet a manager's SIGTERM: two stop signals at once must drain, not force an exit.
    (SIGTERM then SIGINT: two different signals are two deliveries, where a second SIGTERM still
    pending would merge with the first.)"""
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=100")
    procs.append(proc)
    wait_until(lambda: topic_stats(http)["messages"] >= 50, message="50 messages")
    proc.signal(signal.SIGTERM)
    proc.signal(signal.SIGINT)  # microseconds later: well within SIGNAL_DEBOUNCE_S
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert "Drained:" in figures["line"], figures["line"]
    assert "Forced exit" not in proc.output and "Killing" not in proc.output
    assert figures["published"] == figures["broker_accepted"] >= 50 and figures["unacknowledged"] == 0


def test_skip_counts_reach_the_broker_exactly(procs, tmp_path):
    """Each pass skips the same rows (2 with the wrong field count, 1 not UTF-8): the broker's
    `skipped` equals what the workers themselves counted, reason by reason, over several passes."""
    path = tmp_path / "bad.csv"
    path.write_bytes(b"gpu_id,active\n1\n2,x,y\n3,\xff\n0,true\n4,false\n")
    proc, http = start_streamer(str(path), "--workers=2", "--rate=20")
    procs.append(proc)

    def agreed():
        body = topic_stats(http)
        workers = body["workers"].values()
        own = sum((Counter(worker["skipped"]) for worker in workers), Counter())
        return all(worker["skipped"].get("field_count", 0) >= 2 * 3 for worker in workers) and body["skipped"] == dict(own) and body

    body = wait_until(agreed, timeout=30, message="the broker's skip counts to equal the workers' over 3 passes each")
    for worker in body["workers"].values():  # whole passes: 2 field_count for each invalid_utf8
        assert worker["skipped"]["field_count"] == 2 * worker["skipped"]["invalid_utf8"] > 0
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output


def test_buffer_messages_bounds_what_a_worker_holds_unacknowledged(procs, sample_csv):
    """Against a broker that never acknowledges, a worker sends --buffer-messages messages and
    then pauses reading (backpressure) instead of sending on."""
    with fake_broker() as (router, url):
        proc, own_http = start_streamer_to(url, sample_csv, "--rate=1000", "--buffer-messages=50", "--shutdown-timeout=1")
        procs.append(proc)
        highest = 0  # the end of the highest sequence number received (resends included)

        def received() -> int:
            nonlocal highest
            while router.poll(0):
                frames = router.recv_multipart()
                if frames[2] == p.PUBLISH:
                    _, first_seq, count = p.PUB_HEADER.unpack(frames[4])
                    highest = max(highest, first_seq + count)
            return highest

        wait_until(lambda: received() >= 50, message="the first 50 messages")
        # unbounded, 1,000 messages/s would send ~1,500 more in this window
        worker = wait_until(lambda: received() and (w := get_json(f"{own_http}/stats")[1]["workers"]["0"])["unacknowledged"] == 50 and w, timeout=10)
        window_end = time.monotonic() + 1.5
        while time.monotonic() < window_end:
            assert received() == 50
            time.sleep(0.05)
        assert worker["sent"] == 50 and get_json(f"{own_http}/stats")[1]["workers"]["0"]["sent"] == 50
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1  # 50 unacknowledged at the end
        assert summary(proc.output)["unacknowledged"] == 50
