"""telemetry-streamer end to end: real processes, free ports, real signals, stats over HTTP."""

import os
import shutil
import signal
import subprocess
import time

import orjson
import pytest
import zmq
from helpers import Proc, alive, children_of, get_json, start_broker, start_streamer, summary, wait_until, workers_of

from broker import protocol as p
from streamer.supervisor import SIGNAL_DEBOUNCE_S


def stats(http: str, topic: str = "telemetry") -> dict:
    status, body = get_json(f"{http}/stats/{topic}")
    assert status == 200, body
    return body


def worker_pids(proc: Proc, count: int) -> list[int]:
    return wait_until(lambda: (pids := workers_of(proc.pid)) and len(pids) >= count and pids, message=f"{count} workers")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_and_nothing_is_lost(procs, sample_csv, signum):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=200")
    procs.append(proc)
    pids = worker_pids(proc, 2)
    wait_until(lambda: stats(http)["messages"] >= 100, message="100 messages")
    body = stats(http)
    assert len(body["producers"]) == 2 and body["uptime_s"] > 0
    proc.signal(signum)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= body["messages"]
    assert figures["unacknowledged"] == 0
    assert sum(figures["workers"].values()) == figures["published"] and set(figures["workers"]) == {0, 1}
    assert proc.lines[-1] == figures["line"]  # the summary is the last line
    assert not any(alive(pid) for pid in pids)


def test_unthrottled_two_workers_drain_exactly(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=0")
    procs.append(proc)
    wait_until(lambda: (b := stats(http))["messages"] >= 20_000 and len(b["producers"]) == 2, message="20,000 messages from 2 workers")
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
    wait_until(lambda: len(stats(http)["producers"]) == 2, message="2 workers publishing")
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
    pids = worker_pids(proc, 3)
    proc.popen.kill()
    proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10, message="workers to exit after the parent's SIGKILL")


def test_bad_rows_are_counted_in_stats_and_the_stream_goes_on(procs, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"gpu_id,active\n0,true\n1\n2,\xff\n3,false\n")
    proc, http = start_streamer(str(path), "--rate=100")
    procs.append(proc)
    body = wait_until(lambda: (b := stats(http))["messages"] >= 20 and b["skipped"] and b, message="messages and skip counts")
    assert set(body["skipped"]) == {"field_count", "invalid_utf8"}
    assert "skipped line 3" in proc.output and "skipped line 4" in proc.output
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output


def test_external_broker(procs, sample_csv):
    broker, zmq_url, http = start_broker()
    procs.append(broker)
    streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={zmq_url}", "--http-port=0", "--workers=2", "--rate=100")
    procs.append(streamer)
    wait_until(lambda: stats(http)["messages"] >= 50, message="50 messages at the external broker")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait() == 0, streamer.output
    figures = summary(streamer.output)
    assert "broker_accepted" not in figures  # not the streamer's to know
    assert stats(http)["messages"] == figures["published"]
    broker.signal(signal.SIGTERM)
    assert broker.wait() == 0
    assert f"telemetry={figures['published']}" in broker.output


def test_messages_on_the_wire(procs, sample_csv):
    """A test-side ROUTER plays the broker: what the workers send is the documented protocol."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url=tcp://127.0.0.1:{port}", "--http-port=0", "--rate=50", "--column-type=active=bool")
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
    finally:
        router.close()
        ctx.term()


def test_batches_stay_within_the_batch_byte_cap(procs, sample_csv):
    """Unthrottled, a worker batches thousands of rows; with a small --max-message-bytes its
    batches are cut to batch_bytes() (64 KiB here), never one frame of hundreds of KB."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    cap = p.batch_bytes(256)
    sizes = []
    try:
        streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url=tcp://127.0.0.1:{port}", "--http-port=0", "--rate=0", "--max-message-bytes=256")
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
    finally:
        router.close()
        ctx.term()
    assert len(sizes) >= 50, streamer.output
    assert max(size for size, _ in sizes) <= cap == 64 << 10
    assert max(n for _, n in sizes) > 100  # still batches, not single messages


def test_hung_broker_does_not_hang_the_drain_and_a_second_signal_forces(procs, sample_csv):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # accepts, never acknowledges
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        proc = Proc("streamer", f"--csv={sample_csv}", f"--broker-url=tcp://127.0.0.1:{port}", "--http-port=0", "--rate=50", "--shutdown-timeout=1")
        procs.append(proc)
        assert router.poll(20_000)
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1  # messages left unacknowledged: not a clean exit
        assert summary(proc.output)["unacknowledged"] > 0
        assert "shutdown timeout" in proc.output
        while router.poll(0):  # what the first streamer sent
            router.recv_multipart()

        proc = Proc("streamer", f"--csv={sample_csv}", f"--broker-url=tcp://127.0.0.1:{port}", "--http-port=0", "--rate=50", "--shutdown-timeout=60")
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
    finally:
        router.close()
        ctx.term()


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root for a PID namespace")
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
    wait_until(lambda: stats(http)["messages"] >= 50)
    init = wait_until(lambda: children_of(proc.pid), message="the namespace's PID 1")[0]
    with open(f"/proc/{init}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
    assert nspid[-1] == "1", nspid  # PID 1 in its own namespace
    os.kill(init, signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] >= 50
