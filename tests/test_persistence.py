"""--persistence end to end: real commands, real signals, kill -9. (A disk that fills up: tests/faults/test_disk.py.)"""

import signal
import subprocess
import sys

import pytest
from helpers import ROOT, Proc, assert_contiguous, dump, get_json, start_broker, start_streamer, summary, wait_until


def test_round_trip_stream_drain_dump(procs, sample_csv, tmp_path):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=0", "--persistence", f"--persistence-dir={tmp_path}", "--segment-bytes=1MiB")
    procs.append(proc)
    wait_until(
        lambda: (s := get_json(f"{http}/stats/telemetry")[1])["messages"] >= 30_000 and len(s["producers"]) == 2,
        message="30,000 messages, from both workers",
    )
    stats = get_json(f"{http}/stats/telemetry")[1]["persistence"]
    assert stats["directory"] == str(tmp_path / "telemetry") and stats["fsync"] == "interval" and stats["segments"] >= 1
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    published = summary(proc.output)["published"]
    records = dump(tmp_path, "--meta")
    assert len(records) == published
    assert records[0]["offset"] == 0
    seqs = assert_contiguous(records)
    assert len(seqs) == 2
    message = records[0]["message"]
    assert list(message) == ["timestamp", "fields"] and message["fields"]["gpu_id"] == 0
    assert records[0]["received"].endswith("Z")
    plain = dump(tmp_path, "--from-offset=10")
    assert plain[0] == records[10]["message"] and len(plain) == published - 10


def test_broker_killed_mid_stream_recovers_every_acknowledged_record(procs, sample_csv, tmp_path):
    broker, zmq_url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}", "--fsync=always", "--segment-bytes=1MiB")
    procs.append(broker)
    streamer = Proc("streamer", f"--csv={sample_csv}", f"--broker-url={zmq_url}", "--http-port=0", "--workers=2", "--rate=0", "--shutdown-timeout=2")
    procs.append(streamer)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 20_000, message="20,000 messages")
    broker.popen.send_signal(signal.SIGKILL)
    broker.wait()
    streamer.signal(signal.SIGTERM)
    streamer.wait()
    acknowledged = summary(streamer.output)["published"]  # what the workers saw acknowledged
    restarted = Proc("broker", "serve", "--port=0", "--http-port=0", "--persistence", f"--persistence-dir={tmp_path}")
    procs.append(restarted)
    restarted.wait_for_line("Broker listening")
    records = dump(tmp_path, "--meta")
    assert records[0]["offset"] == 0
    assert_contiguous(records)
    assert len(records) >= acknowledged  # nothing acknowledged under --fsync=always is lost
    restarted.signal(signal.SIGTERM)
    assert restarted.wait() == 0


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--persistence", "--broker-url=tcp://127.0.0.1:5555"], 2, "--persistence belongs to the broker"),
        (["--persistence", "--persistence-dir=/etc/hostname/mq"], 1, "cannot use persistence directory /etc/hostname/mq"),
        (["--persistence", "--segment-bytes=12XB"], 2, "--segment-bytes"),
        (["--persistence", "--retention-age=soon"], 2, "--retention-age"),
        (["--persistence", "--fsync=sometimes"], 2, "--fsync"),
    ],
)
def test_persistence_option_errors_are_one_line(args, code, words):
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "--csv=data/gpu_metrics.csv", "--broker-port=0", "--http-port=0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and words in lines[-1]


def test_dump_works_in_a_pipe_and_names_a_missing_topic(tmp_path, procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--rate=0", "--persistence", f"--persistence-dir={tmp_path}")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 5000)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    piped = subprocess.run(
        f"{sys.executable} -m broker dump --persistence-dir={tmp_path} | head -n 3", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 3 and "Traceback" not in piped.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "broker", "dump", f"--persistence-dir={tmp_path}", "--topic=nope"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert missing.returncode == 1 and "no log for topic 'nope'" in missing.stderr
