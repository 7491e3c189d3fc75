"""Low idle cost: a slow stream wakes its worker once per --linger, not once per message, and the
messages still carry evenly spaced timestamps at exactly the rate. Counted, not timed."""

from __future__ import annotations

import datetime
import signal
import time

import pytest
from helpers import dump, get_json, start_broker, start_streamer, summary, wait_until, workers_of


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


@pytest.mark.parametrize("linger, most_wakeups_per_s", [("0.5", 12), ("0", None)])
def test_a_slow_worker_wakes_per_linger_not_per_message(procs, sample_csv, linger, most_wakeups_per_s):
    proc, http = start_streamer(sample_csv, "--workers=1", "--rate=40", f"--linger={linger}")
    procs.append(proc)
    worker = wait_until(lambda: workers_of(proc.pid), message="the worker")[0]
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] > 0, message="the worker publishing")
    before, started = _switches(worker), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 3.0, interval=0.2, message="a 3 s window")
    per_second = (_switches(worker) - before) / (time.monotonic() - started)
    if most_wakeups_per_s is not None:
        # 40 messages/s: 2 chunks a second, their 2 acknowledgments, 1 status; each a wake-up
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


def test_an_idle_broker_sleeps(procs, tmp_path):
    """With persistence (--fsync=interval) and a consumer group, an idle broker wakes about once a
    second (its rate sampler, its fsync interval), not every 0.1 or 0.2 s to poll for work."""
    proc, zmq_url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    before, started = _switches(proc.pid), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 3.0, interval=0.5, message="a 3 s window")
    per_second = (_switches(proc.pid) - before) / (time.monotonic() - started)
    assert per_second <= 5, per_second  # polling timers made it ~16 (fsync check 10/s, redelivery 5/s, sampler 1/s)
