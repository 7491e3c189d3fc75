"""Low idle cost: a slow stream wakes its worker once per --linger, not once per message, and the
messages still carry evenly spaced timestamps at exactly the rate. Counted, not timed."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest
from helpers import ROOT, children_of, dump, fake_broker, get_json, start_broker, start_streamer, summary, topic_stats, wait_until, workers_of


def _switches(pid: int) -> int:
    """Times the process's main thread blocked and was woken (voluntary context switches)."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def _ns(stamp: str) -> int:
    whole, fraction = stamp.rstrip("Z").split(".")
    seconds = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int(fraction)


@pytest.mark.parametrize("linger, most_wakeups_per_s", [("0.5", 6), ("0", None)])
def test_a_slow_worker_wakes_per_linger_not_per_message(procs, sample_csv, linger, most_wakeups_per_s):
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=40", f"--linger={linger}")
    procs.append(proc)
    worker = wait_until(lambda: workers_of(proc.pid), message="the worker")[0]
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] > 0, message="the worker publishing")
    before, started = _switches(worker), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 3.0, interval=0.2, message="a 3 s window")
    per_second = (_switches(worker) - before) / (time.monotonic() - started)
    if most_wakeups_per_s is not None:
        # 40 messages/s: 2 chunks a second and their 2 acknowledgments, each a wake-up; the status
        # rides on an acknowledgment and the resend check is a timer only while a batch is in
        # flight (they were 1 and 2 wake-ups a second of their own: 7 in all)
        assert per_second <= most_wakeups_per_s, per_second
    else:
        assert per_second >= 40, per_second  # one send and one acknowledgment per message: what linger saves
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output


def test_lingering_messages_keep_evenly_spaced_timestamps(procs, sample_csv, tmp_path):
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=20", "--persistence", f"--persistence-dir={tmp_path}", "--fsync=always")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 40, timeout=30, message="40 messages")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output
    records = dump(tmp_path)
    assert len(records) == summary(proc.output)["published"] >= 40
    stamps = [_ns(message["timestamp"]) for message in records]
    gaps = {b - a for a, b in zip(stamps, stamps[1:])}
    assert gaps == {50_000_000}, sorted(gaps)[:5]  # exactly 1/20 s apart, across chunks too


def test_a_slow_streams_first_message_goes_at_once_not_a_linger_later(procs, sample_csv, tmp_path):
    """At 1 message/s with --linger=10 a chunk is 10 messages: the first chunk used to go when its
    last message fell due, 9 s after the first was stamped. The first message now goes alone and
    at once (the broker receives it within moments of its timestamp), and the chunks after it
    keep the schedule: timestamps exactly 1 s apart from the first."""
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=1", "--linger=10", "--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 1, timeout=30, message="the first message")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output
    records = dump(tmp_path, "--meta")
    assert len(records) == summary(proc.output)["published"] >= 1
    first = records[0]
    waited_s = (_ns(first["received"]) - _ns(first["message"]["timestamp"])) / 1e9
    assert waited_s < 5, waited_s  # 9 s before
    stamps = [_ns(r["message"]["timestamp"]) for r in records]
    assert {b - a for a, b in zip(stamps, stamps[1:])} <= {1_000_000_000}


def test_an_idle_broker_sleeps(procs, tmp_path):
    """With persistence (--fsync=interval) and a consumer group, an idle broker wakes about once a
    second (its rate sampler, its fsync interval), not every 0.1 or 0.2 s to poll for work."""
    proc, zmq_url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    before, started = _switches(proc.pid), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 3.0, interval=0.5, message="a 3 s window")
    per_second = (_switches(proc.pid) - before) / (time.monotonic() - started)
    assert per_second <= 5, per_second  # polling timers made it ~16 (fsync check 10/s, redelivery 5/s, sampler 1/s)


def test_a_slow_workers_figures_in_stats_settle(procs, sample_csv):
    """The status rides on an acknowledgment: at one message every 2 s, /stats shows each one
    acknowledged (not one batch behind, as a status sent along with the batch would)."""
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=0.5")
    procs.append(proc)

    def settled():
        body = topic_stats(http)
        worker = body["workers"]["0"]
        return body["messages"] >= 2 and worker["published"] == worker["sent"] == body["messages"] and worker["unacknowledged"] == 0

    wait_until(settled, timeout=20, interval=0.1, message="the worker's figures to equal the broker's")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output


def test_an_unacknowledged_batch_is_resent_when_due_and_an_acknowledged_one_never(tmp_path):
    """The publisher's resend check is a timer armed while something is in flight: a batch nobody
    acknowledges is sent again once ack_timeout has passed (and again, backing off), and one that
    is acknowledged is not, however long the publisher then waits."""
    import asyncio

    from broker import protocol as p
    from broker.client import Publisher

    with fake_broker() as (router, url):
        received: list[int] = []  # first_seq of every PUBLISH, resends included

        def take(identities: dict) -> None:
            while router.poll(0):
                frames = router.recv_multipart()
                if frames[2] == p.PUBLISH:
                    producer, first_seq, count = p.PUB_HEADER.unpack(frames[4])
                    received.append(first_seq)
                    identities[first_seq] = (frames[0], producer, count)

        async def until(condition, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < deadline, received
                await asyncio.sleep(0.02)

        async def scenario() -> Publisher:
            pub = Publisher(url, "telemetry", ack_timeout=0.5)
            await pub.start()
            identities: dict = {}
            try:
                await pub.publish(b'{"v":0}', 1)
                await until(lambda: take(identities) or received.count(0) >= 3, timeout=10)  # sent, resent, resent again
                identity, producer, count = identities[0]
                router.send_multipart([identity, *p.ack_frames(producer, 0, count, 0)])
                await until(lambda: pub.unacked == 0, timeout=10)
                await pub.publish(b'{"v":1}', 1)
                await until(lambda: take(identities) or 1 in identities, timeout=10)
                identity, producer, count = identities[1]
                router.send_multipart([identity, *p.ack_frames(producer, 1, count, 1)])
                await until(lambda: pub.unacked == 0, timeout=10)
                quiet_until = time.monotonic() + 2.0  # four ack timeouts: nothing more may come
                await until(lambda: take(identities) or time.monotonic() >= quiet_until, timeout=10)
                return pub
            finally:
                await pub.close()

        pub = asyncio.run(scenario())
    assert received.count(1) == 1, received  # acknowledged at once: never resent
    assert received.count(0) >= 3 and set(received) == {0, 1}, received
    assert pub.published == 2 and pub.resends == received.count(0) - 1


def test_idle_workers_wake_neither_themselves_nor_the_supervisor(procs, sample_csv):
    """Workers with nothing to send (a filter leaves them no rows) send no status while nothing
    changes (their counts are in memory the supervisor reads) and have no resend check armed
    (nothing is in flight): a worker wakes for its fallback timer only (2, 4, 8, then every 10 s),
    the streamer's main thread for its own timers (the broker's rate sampler, once a second).
    Measured: 0.25 and 1.25 wake-ups a second; they were 2.5-2.7 per worker (its status, its
    resend check) and 4.0-4.2 for the main thread with 3 workers (their statuses)."""
    proc, http = start_streamer(sample_csv, "--workers=3", "--filter=hostname=nowhere")
    procs.append(proc)
    workers = wait_until(lambda: len(w := workers_of(proc.pid)) == 3 and w, message="3 workers")
    wait_until(lambda: proc.output.count("no rows to send") == 3, message="the workers idle")
    settled = time.monotonic()
    wait_until(lambda: time.monotonic() - settled >= 2.0, interval=0.2, message="past the first statuses")
    main_before, workers_before, started = _switches(proc.pid), [_switches(w) for w in workers], time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 4.0, interval=0.5, message="a 4 s window")
    elapsed = time.monotonic() - started
    main_per_s = (_switches(proc.pid) - main_before) / elapsed
    workers_per_s = [(_switches(w) - before) / elapsed for w, before in zip(workers, workers_before)]
    assert main_per_s <= 2.5, main_per_s
    assert max(workers_per_s) <= 1.0, workers_per_s
    assert topic_stats(http)["workers"]["0"]["sent"] == 0
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output


def test_the_process_tree_is_the_streamer_its_fork_server_and_the_workers(procs, sample_csv):
    """No resource tracker (an interpreter of its own, 8.4 MB PSS): nothing in the streamer
    needs it, and its PSS counts against the idle target."""
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=10")
    procs.append(proc)
    workers = wait_until(lambda: len(w := workers_of(proc.pid)) == 2 and w, message="2 workers")
    children = children_of(proc.pid)
    assert len(children) == 1, [_cmdline(c) for c in children]
    with open(f"/proc/{children[0]}/comm") as f:
        assert f.read().strip() == "forkserver"  # a fork of the streamer (streamer.forkserver), named
    assert sorted(children_of(children[0])) == sorted(workers)
    # in ps and top, not the fork server's name they inherit (each names itself as it starts)
    wait_until(lambda: {_comm(w) for w in workers} == {"worker-0", "worker-1"}, message="the workers named")
    wait_until(lambda: topic_stats(http)["workers"]["1"]["published"] > 0, message="the workers publishing")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_workers_do_not_run_the_main_script_again(monkeypatch):
    """multiprocessing runs a script main module (the telemetry-streamer console script) again in
    every child; a worker needs nothing from it, and it imported the whole command line into each
    (1.8 MB of its own per worker)."""
    import sys
    import types
    from multiprocessing import spawn

    from streamer.supervisor import _main_script_not_rerun

    script = types.ModuleType("__main__")
    script.__file__, script.__spec__ = "/usr/local/bin/telemetry-streamer", None
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert spawn.get_preparation_data("worker-0")["init_main_from_path"] == script.__file__  # what it would do
    with _main_script_not_rerun():
        data = spawn.get_preparation_data("worker-0")
    assert "init_main_from_path" not in data and data["init_main_from_name"].endswith(".__main__")
    assert script.__spec__ is None  # as it was


_FORK_SERVER_PROBE = """
import multiprocessing, os, sys, threading, time
from streamer import forkserver, workerproc

def exit_with(code):
    os._exit(code)

if __name__ == "__main__":
    if sys.argv[1] == "thread":
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    forked = forkserver.start()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(forkserver.PRELOAD)
    child = context.Process(target=exit_with, args=(7,))
    child.start()
    child.join(30)
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    with open(f"/proc/{server}/comm") as f:
        name = f.read().strip()
    fds = []
    for fd in os.listdir(f"/proc/{server}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{server}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile (the finished child's status pipe)
            pass
    print(forked, child.exitcode, name, len(fds), sorted(fds), flush=True)
"""


@pytest.mark.parametrize("threads", ["none", "thread"])
def test_the_fork_server_is_a_fork_of_the_streamer_unless_a_thread_runs(tmp_path, threads):
    """Forked while the streamer has only its one thread (everything it imported is then shared
    with the workers); with another thread multiprocessing starts a new interpreter, as before.
    Either way a worker's exit code comes back, and the fork server holds only its own descriptors
    (none of the streamer's files: it is forked before the broker opens its log)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_FORK_SERVER_PROBE)
    env = {**os.environ, "PYTHONPATH": ROOT}  # this tree's streamer, not an installed one
    with open(tmp_path / "held.txt", "w") as held:  # a file the streamer has open when it forks
        out = subprocess.run(
            [sys.executable, str(script), threads],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=[held.fileno()],
        )
    assert out.returncode == 0, out.stderr
    forked, exitcode, name, _count, fds = out.stdout.split(" ", 4)
    assert exitcode == "7"
    assert (forked, name == "forkserver") == (("True", True) if threads == "none" else ("False", False))
    # its descriptors: /dev/null for standard input, the pipes and sockets it serves with; no file
    assert "held.txt" not in fds and all(fd.startswith(("'/dev/null'", "'pipe:", "'socket:", "'anon_inode:")) for fd in fds.strip("[]\n").split(", ")), fds


_BODY = b"\n".join([b'{"v":%d}' % i for i in range(20_000)])  # 20,000 messages, well past pyzmq's copy threshold (64 KiB)


@pytest.fixture
def lent(monkeypatch) -> list[tuple]:
    """The buffers lent to ZeroMQ from now on (pyzmq's garbage collector stores each one)."""
    from zmq.utils import garbage

    stored: list[tuple] = []
    store = garbage.gc.store
    monkeypatch.setattr(garbage.gc, "store", lambda *args: stored.append(args) or store(*args))
    return stored


def test_a_publisher_hands_its_batches_to_zeromq_without_the_garbage_collector_thread(lent):
    """A batch body is copied into ZeroMQ (one memcpy) instead of lent to it: a lent (zero-copy)
    buffer is released by pyzmq's garbage-collector thread, one GIL hand-over per batch, and in a
    busy worker that thread fell behind, freed batches in bursts and made the heap shrink and grow
    again (about 20,000 page faults a second per worker with two workers; docs/BENCHMARKS.md)."""
    import asyncio

    from broker import protocol as p
    from broker.client import Publisher

    body = _BODY
    with fake_broker() as (router, url):

        async def scenario() -> bytes:
            pub = Publisher(url, "telemetry", ack_timeout=60.0)  # no resend (resends are lent: the next test)
            await pub.start()
            try:
                await pub.publish(body, 20_000)
                deadline = time.monotonic() + 10
                while not router.poll(0):
                    assert time.monotonic() < deadline, "no PUBLISH arrived"
                    await asyncio.sleep(0.01)
                return router.recv_multipart()[5]
            finally:
                await pub.close()

        assert asyncio.run(scenario()) == body
    assert p.message_count(body) == 20_000
    assert lent == []


def test_resent_batches_are_lent_to_zeromq_so_an_outage_does_not_pile_up_copies(lent):
    """While the broker does not answer, ZeroMQ queues every resend (up to SNDHWM): a resend lends
    the body the window already holds, so resends add no memory (copied, each resend of a 16 MiB
    window would add 16 MiB until the queue is full)."""
    import asyncio

    from broker import protocol as p
    from broker.client import Publisher

    body = _BODY
    with fake_broker() as (router, url):  # receives, never acknowledges

        async def scenario() -> int:
            pub = Publisher(url, "telemetry", ack_timeout=0.05)
            await pub.start()
            received = 0
            try:
                await pub.publish(body, 20_000)
                deadline = time.monotonic() + 30
                while received < 3:  # the send and two resends
                    assert time.monotonic() < deadline, received
                    while router.poll(0):
                        received += router.recv_multipart()[2] == p.PUBLISH
                    await asyncio.sleep(0.01)
                return pub.resends
            finally:
                await pub.close()

        resends = asyncio.run(scenario())
    assert resends >= 2
    assert len(lent) == resends  # every resend lent, the first send copied
    assert all(args[0] is body for args in lent)  # the very body the window holds: no copy


def test_an_unthrottled_worker_does_not_fault_its_batch_memory_in_again(procs, sample_csv):
    """A worker's batch bodies (built, sent, held until acknowledged, freed) reuse freed heap
    memory: before, each new body faulted its pages in again (24.7 page faults per 1,000 messages
    here, one worker on the sample CSV). Counted over a million messages, whatever the machine's
    speed; the bound leaves room for the heap's first growth if the broker stalls meanwhile."""
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=0")
    procs.append(proc)
    worker = wait_until(lambda: workers_of(proc.pid), message="the worker")[0]
    messages = lambda: get_json(f"{http}/stats/telemetry")[1]["messages"]  # noqa: E731
    wait_until(lambda: messages() >= 200_000, timeout=60, message="a warmed-up worker")

    def minor_faults() -> int:
        with open(f"/proc/{worker}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])

    faults, start = minor_faults(), messages()
    wait_until(lambda: messages() >= start + 1_000_000, timeout=120, interval=0.2, message="a million more messages")
    per_thousand = (minor_faults() - faults) * 1000 / (messages() - start)
    assert per_thousand < 5.0, per_thousand
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0, proc.output
