"""Disk full under the log, then space freed: no acknowledged message is lost, writing resumes."""

import resource
import signal

from helpers import Proc, assert_contiguous, dump, get_json, summary, wait_until


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_disk_full_stops_acknowledgments_then_writing_resumes(procs, sample_csv, tmp_path):
    """A file-size limit stands in for a full disk; raising it stands in for freeing space."""
    broker = Proc("broker", "serve", "--port=0", "--http-port=0", "--persistence", f"--persistence-dir={tmp_path}", preexec_fn=_limit_file_size(2 << 20))
    procs.append(broker)
    match = broker.wait_for_line(r"ZeroMQ (\S+), HTTP (http://\S+) ")
    zmq_url, http = match.group(1).rstrip(","), match.group(2)
    streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={zmq_url}", "--http-port=0", "--rate=0", "--shutdown-timeout=30")
    procs.append(streamer)
    wait_until(lambda: get_json(f"{http}/healthz")[0] == 503, timeout=60, message="/healthz to report the write error")
    status, body = get_json(f"{http}/healthz")
    assert "telemetry" in body["log_errors"]
    stats = get_json(f"{http}/stats/telemetry")[1]
    assert stats["persistence"]["healthy"] is False
    stuck = stats["messages"]
    resource.prlimit(broker.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space freed
    wait_until(lambda: get_json(f"{http}/healthz")[0] == 200, timeout=60, message="writing to resume")
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] > stuck + 1000, timeout=60, message="acknowledgments to resume")
    streamer.signal(signal.SIGTERM)
    assert streamer.wait(timeout=60) == 0, streamer.output
    published = summary(streamer.output)["published"]
    records = dump(tmp_path, "--meta")
    assert_contiguous(records)
    assert len(records) == published
    assert "write failed" in broker.output and "writes succeed again" in broker.output
