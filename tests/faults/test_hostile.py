"""Hostile peers (issue 15): frames, floods and reports meant to crash, starve or poison the broker.
Each test drives a real broker over its real sockets and checks that the broker refuses, counts,
and keeps serving everyone else."""

import os
import signal
import subprocess
import sys
import urllib.request

import orjson
import pytest
import zmq
from helpers import PRODUCER, ROOT, Proc, broker_and_dealer, dealer_socket, get_json, publish, start_broker, wait_until

from broker import protocol as p
from common.reports import SKIP_REASONS


def recv(sock, timeout_ms: int = 5000) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(timeout_ms) else None


def is_error(reply, command: bytes, reason: bytes) -> bool:
    return reply is not None and reply[:3] == [p.SIGNATURE, p.ERROR, command] and reply[4] == reason


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# -- bounded resources -----------------------------------------------------------------------------


def test_only_a_publish_creates_a_topic_and_only_below_max_topics(procs, tmp_path):
    """A topic flood (any frame type naming new topics) creates at most --max-topics topics; frames
    naming an unknown topic are refused with an ERROR frame and counted; the broker restarts."""
    data = str(tmp_path / "data")
    with broker_and_dealer(procs, "--max-topics=5", "--persistence", f"--persistence-dir={data}") as (proc, dealer, http, url):
        for i in range(30):  # subscribing, consuming, acknowledging, reporting: none creates a topic
            name = b"ghost-%d" % i
            dealer.send_multipart(p.subscribe_frames(name, p.FROM_BEGINNING, 0, 10))
            assert is_error(recv(dealer), p.SUBSCRIBE, b"unknown topic")
            dealer.send_multipart(p.consume_frames(name, b"g", 10))
            assert is_error(recv(dealer), p.CONSUME, b"unknown topic")
            dealer.send_multipart(p.group_ack_frames(name, b"g", [0]))
            assert is_error(recv(dealer), p.GROUP_ACK, b"unknown topic")
            dealer.send_multipart(p.report_frames(name, PRODUCER, b"{}"))
            dealer.send_multipart(p.credit_frames(name, 5))
        stats = wait_until(lambda: (s := get_json(f"{http}/stats")[1])["bad_frames"]["unknown_topic"] == 30 * 5 and s)
        assert list(stats["topics"]) == ["telemetry"]
        assert not any(name.startswith("ghost") for name in os.listdir(data))
        replies = [publish(dealer, 0, [1], topic=b"t-%d" % i) for i in range(20)]  # a PUBLISH creates one, up to the limit
        assert [r[1] for r in replies] == [p.ACK] * 4 + [p.NACK] * 16
        assert replies[-1][3] == p.NACK_UNAVAILABLE and replies[-1][4] == b"topic limit reached"
        stats = get_json(f"{http}/stats")[1]
        assert len(stats["topics"]) == 5 and stats["bad_frames"]["topic_limit"] == 16
        assert publish(dealer, 1, [2], topic=b"t-0")[1] == p.ACK  # the existing ones keep working
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    # and it comes back with what it had
    proc, url, http = start_broker("--max-topics=5", "--persistence", f"--persistence-dir={data}")
    procs.append(proc)
    assert sorted(get_json(f"{http}/stats")[1]["topics"]) == ["t-0", "t-1", "t-2", "t-3", "telemetry"]


def test_subscribers_groups_members_and_sse_streams_are_limited(procs):
    with broker_and_dealer(procs, "--max-subscribers=2", "--max-groups=2", "--max-sse=1") as (proc, dealer, http, url):
        ctx = zmq.Context()
        socks = [dealer_socket(ctx, url) for _ in range(3)]
        try:
            topic = f"{http}/stats/telemetry"
            for i, sock in enumerate(socks[:2], 1):  # one after the other: connections race
                sock.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 10))
                wait_until(lambda i=i: len(get_json(topic)[1]["subscribers"]) == i)
            socks[2].send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 10))
            assert is_error(recv(socks[2]), p.SUBSCRIBE, b"too many subscribers")
            for i, sock in enumerate(socks[:2], 1):
                sock.send_multipart(p.consume_frames(b"telemetry", b"g", 10))
                wait_until(lambda i=i: get_json(topic)[1]["groups"]["g"]["consumers"] == i)
            socks[2].send_multipart(p.consume_frames(b"telemetry", b"g", 10))
            assert is_error(recv(socks[2]), p.CONSUME, b"too many members")
            for group in (b"h", b"i"):
                dealer.send_multipart(p.consume_frames(b"telemetry", group, 10))
            assert is_error(recv(dealer), p.CONSUME, b"too many groups")
            stats = get_json(f"{http}/stats/telemetry")[1]
            assert len(stats["subscribers"]) == 2 and sorted(stats["groups"]) == ["g", "h"]
            assert stats["groups"]["g"]["consumers"] == 2
            with urllib.request.urlopen(f"{http}/topics/telemetry/stream", timeout=10) as first:
                assert first.readline().startswith(b"retry:")
                assert http_status(f"{http}/topics/telemetry/stream") == 503  # --max-sse=1
        finally:
            for sock in socks:
                sock.close()
            ctx.term()
        assert publish(dealer, 0, [1])[1] == p.ACK


def test_idle_producers_expire_and_a_topic_tracks_at_most_max_producers(procs):
    with broker_and_dealer(procs, "--max-producers=2", "--producer-expiry=1s") as (proc, dealer, http, url):
        assert publish(dealer, 0, [1], producer=b"a" * 16)[1] == p.ACK
        assert publish(dealer, 0, [1], producer=b"b" * 16)[1] == p.ACK
        refused = publish(dealer, 0, [1], producer=b"c" * 16)
        assert refused[1] == p.NACK and refused[3] == p.NACK_UNAVAILABLE and b"too many producers" in refused[4]
        assert get_json(f"{http}/stats/telemetry")[1]["rejected"] == {"producer_limit": 1}
        # idle for longer than --producer-expiry: forgotten, so a new producer gets in
        wait_until(lambda: not get_json(f"{http}/stats/telemetry")[1]["producers"], timeout=10, message="idle producers to expire")
        assert publish(dealer, 0, [1], producer=b"c" * 16)[1] == p.ACK


def test_replay_never_runs_ahead_of_the_credit_granted(procs):
    with broker_and_dealer(procs) as (proc, dealer, http, url):
        for i in range(10):
            assert publish(dealer, i, [i])[1] == p.ACK
        ctx = zmq.Context()
        sub = dealer_socket(ctx, url)
        try:
            sub.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_BEGINNING, 0, 3))
            got = [recv(sub) for _ in range(3)]
            assert [p.DELIVER_HEADER.unpack(f[3])[0] for f in got] == [0, 1, 2]
            assert recv(sub, 500) is None  # no credit left: nothing more
            sub.send_multipart(p.credit_frames(b"telemetry", 2))
            assert [p.DELIVER_HEADER.unpack(recv(sub)[3])[0] for _ in range(2)] == [3, 4]
            assert recv(sub, 500) is None
        finally:
            sub.close()
            ctx.term()


# -- reports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report",
    [
        b'{"skipped": 5}',
        b'{"skipped": {"field_count": -1}}',
        b'{"skipped": {"field_count": 1.5}}',
        b'{"skipped": {"field_count": "2"}}',
        b'{"skipped": {"made_up_reason": 1}}',
        orjson.dumps({"skipped": {f"reason-{i}": 1 for i in range(1000)}}),
        b'{"name": 7}',
        b'{"other": 1}',
        b"[1, 2]",
        b"not json",
    ],
    ids=["not_a_dict", "negative", "float", "string", "unknown_reason", "many_reasons", "bad_name", "unknown_key", "list", "not_json"],
)
def test_a_bad_report_is_refused_and_counted_and_stats_and_metrics_keep_answering(procs, report):
    with broker_and_dealer(procs) as (proc, dealer, http, url):
        assert publish(dealer, 0, [1])[1] == p.ACK  # reports are kept only for producers that published
        dealer.send_multipart(p.report_frames(b"telemetry", PRODUCER, orjson.dumps({"name": "w", "skipped": {"field_count": 3}})))
        wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["skipped"] == {"field_count": 3})
        dealer.send_multipart(p.report_frames(b"telemetry", PRODUCER, report))
        stats = wait_until(lambda: (s := get_json(f"{http}/stats"))[0] == 200 and s[1]["bad_frames"].get("bad_report") and s[1])
        assert stats["bad_frames"] == {"bad_report": 1}
        assert stats["topics"]["telemetry"]["skipped"] == {"field_count": 3}  # the last good report stands
        with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        skipped = [line for line in metrics.splitlines() if line.startswith("telemetry_rows_skipped_total{")]
        assert skipped == ['telemetry_rows_skipped_total{reason="field_count",topic="telemetry"} 3.0']


def test_a_huge_report_is_refused_before_it_is_parsed(procs):
    with broker_and_dealer(procs, "--max-report-bytes=4KiB") as (proc, dealer, http, url):
        assert publish(dealer, 0, [1])[1] == p.ACK
        dealer.send_multipart(p.report_frames(b"telemetry", PRODUCER, orjson.dumps({"name": "x" * 5000})))
        stats = wait_until(lambda: (s := get_json(f"{http}/stats")[1])["bad_frames"] and s)
        assert stats["bad_frames"] == {"report_too_large": 1}
        assert stats["topics"]["telemetry"]["producers"][PRODUCER.hex()]["name"] == ""
    assert set(SKIP_REASONS) >= {"field_count", "malformed"}  # the streamer's reasons are the broker's


# -- consumers own their deliveries ----------------------------------------------------------------


def test_only_the_member_a_message_was_delivered_to_can_acknowledge_it(procs):
    with broker_and_dealer(procs, "--ack-timeout=30s") as (proc, dealer, http, url):
        ctx = zmq.Context()
        a, b = dealer_socket(ctx, url), dealer_socket(ctx, url)
        try:
            a.send_multipart(p.consume_frames(b"telemetry", b"g", 1))
            wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"].get("g", {}).get("consumers") == 1)
            b.send_multipart(p.consume_frames(b"telemetry", b"g", 1))
            wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]["consumers"] == 2)
            assert publish(dealer, 0, [0, 1])[1] == p.ACK
            offset_a = p.MSG_HEADER.unpack(recv(a)[4])[0]
            offset_b = p.MSG_HEADER.unpack(recv(b)[4])[0]
            assert {offset_a, offset_b} == {0, 1}
            b.send_multipart(p.group_ack_frames(b"telemetry", b"g", [offset_a]))  # someone else's
            stats = wait_until(lambda: (s := get_json(f"{http}/stats"))[1]["bad_frames"].get("foreign_ack") and s[1])
            group = stats["topics"]["telemetry"]["groups"]["g"]
            assert group["foreign_acks"] == 1 and group["in_flight"] == 2 and group["committed"] == 0
            a.send_multipart(p.group_ack_frames(b"telemetry", b"g", [offset_a]))
            b.send_multipart(p.group_ack_frames(b"telemetry", b"g", [offset_b]))
            wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]["committed"] == 2)
        finally:
            a.close()
            b.close()
            ctx.term()


# -- supervised tasks ------------------------------------------------------------------------------

FAILING_BROKER = """
import sys
import broker.topic

calls = 0
def sample_rate(self, now):  # a bug in a background task (the rate sampler), after a while
    global calls
    calls += 1
    if calls > 2:
        raise RuntimeError("injected failure")
broker.topic.Topic.sample_rate = sample_rate
from broker.cli import main
sys.argv[0] = "telemetry-broker"
main()
"""


def test_a_background_task_that_dies_fails_the_broker_loudly(procs):
    """A supervised task that ends unexpectedly: its traceback is logged, /healthz turns 503, and
    the process exits non-zero (for its supervisor to restart it), instead of limping on."""
    proc = Proc(argv=[sys.executable, "-c", FAILING_BROKER, "serve", "--port=0", "--http-port=0"])
    procs.append(proc)
    http = proc.wait_for_line(r"HTTP (http://\S+) ").group(1)
    health = []

    def failed() -> bool:
        try:
            health.append(http_status(f"{http}/healthz"))
        except OSError:
            pass  # closing
        return proc.popen.poll() is not None

    wait_until(failed, timeout=20, message="the broker to exit after its task failed")
    assert proc.wait() == 1
    assert "task 'broker rates' ended unexpectedly" in proc.output
    assert "Traceback" in proc.output and "RuntimeError: injected failure" in proc.output
    assert "telemetry-broker: error: the broker stopped" in proc.output
    assert health[0] == 200


def test_healthz_turns_503_when_a_task_dies(tmp_path):
    """In process, to see the moment between the failure and the exit: /healthz answers 503."""
    import asyncio

    import aiohttp

    from broker.config import BrokerConfig
    from broker.server import Broker

    async def scenario():
        broker = Broker(BrokerConfig(port=0, http_port=0))
        await broker.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{broker.http_url}/healthz") as response:
                    assert response.status == 200
                broker._supervise("doomed", asyncio.sleep(0, result=None))  # ends: a task that should never end
                await asyncio.wait_for(broker.failed.wait(), 5)
                async with session.get(f"{broker.http_url}/healthz") as response:
                    return response.status, await response.json()
        finally:
            await broker.close()

    status, body = asyncio.run(scenario())
    assert status == 503 and "doomed" in body["failure"]


# -- the disk --------------------------------------------------------------------------------------


def test_the_default_data_directory_is_the_users_state_directory_and_private(procs, tmp_path):
    state = tmp_path / "state"
    env = {"XDG_STATE_HOME": str(state)}
    proc = Proc("broker", "serve", "--port=0", "--http-port=0", "--persistence", env=env)
    procs.append(proc)
    url = proc.wait_for_line(r"ZeroMQ (\S+), HTTP").group(1).rstrip(",")
    ctx = zmq.Context()
    dealer = dealer_socket(ctx, url)
    try:
        assert publish(dealer, 0, [1])[1] == p.ACK
        dealer.send_multipart(p.consume_frames(b"telemetry", b"g", 1))
        recv(dealer)
        dealer.send_multipart(p.group_ack_frames(b"telemetry", b"g", [0]))
    finally:
        dealer.close()
        ctx.term()
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    data = state / "telemetry-streamer"
    topic = data / "telemetry"
    assert (topic / "00000000000000000000.log").exists()
    for path in (data, topic, topic / "groups"):
        assert oct(path.stat().st_mode & 0o777) == "0o700", path
    files = [topic / "00000000000000000000.log", topic / "00000000000000000000.index", topic / "groups" / "g"]
    for path in files:
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
    assert os.environ.get("XDG_STATE_HOME") != str(state)


@pytest.mark.parametrize("planted", [".writable", "00000000000000000000.log", "00000000000000000000.index"])
def test_a_symlink_planted_in_the_data_directory_is_refused_not_followed(procs, tmp_path, planted):
    data = tmp_path / "data"
    (data / "telemetry").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n" * 100)
    os.symlink(victim, data / "telemetry" / planted)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--port=0", "--http-port=0", "--persistence", f"--persistence-dir={data}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert victim.read_bytes() == b"precious\n" * 100  # neither truncated nor written
    assert result.returncode == 1
    assert "Too many levels of symbolic links" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_a_symlinked_topic_directory_is_not_used(procs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, data / "planted")
    with broker_and_dealer(procs, "--persistence", f"--persistence-dir={data}") as (proc, dealer, http, url):
        assert "planted" not in get_json(f"{http}/stats")[1]["topics"]  # not opened at start
        reply = publish(dealer, 0, [1], topic=b"planted")  # nor created through the link
        assert reply[1] == p.NACK and reply[3] == p.NACK_INVALID
        assert publish(dealer, 0, [1])[1] == p.ACK
    assert os.listdir(elsewhere) == []


def test_a_subscription_without_credit_that_went_quiet_is_dropped(procs):
    """A subscriber that left without UNSUBSCRIBE (and so never takes its slot back) is dropped
    once it has had no credit and sent nothing for --subscriber-idle."""
    with broker_and_dealer(procs, "--subscriber-idle=1s", "--max-subscribers=1") as (proc, dealer, http, url):
        ctx = zmq.Context()
        ghost = dealer_socket(ctx, url)
        try:
            ghost.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 0))
            wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["subscribers"])
            dealer.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 10))
            assert is_error(recv(dealer), p.SUBSCRIBE, b"too many subscribers")
            wait_until(lambda: not get_json(f"{http}/stats/telemetry")[1]["subscribers"], timeout=10, message="the quiet subscription to be dropped")
            dealer.send_multipart(p.subscribe_frames(b"telemetry", p.FROM_LIVE, 0, 10))
            assert publish(dealer, 0, [1])[1] == p.ACK
            assert recv(dealer)[1] == p.DELIVER  # the slot is the live subscriber's now
        finally:
            ghost.close()
            ctx.term()


def test_dead_letters_of_dead_letters_keep_the_redelivery_timer_alive(procs):
    """Found by the frame fuzz test: the broker's dead-letter producer kept one sequence for every
    .dlq topic, so a dead letter to `<topic>.dlq` after one to `<topic>.dlq.dlq` was a sequence gap
    that killed the redelivery timer (before: silently, and redelivery stopped for good)."""
    with broker_and_dealer(procs, "--ack-timeout=300ms", "--max-deliveries=1") as (proc, dealer, http, url):
        ctx = zmq.Context()
        a, b = dealer_socket(ctx, url), dealer_socket(ctx, url)
        try:
            a.send_multipart(p.consume_frames(b"telemetry", b"g", 10))  # never acknowledges
            assert publish(dealer, 0, [0, 1])[1] == p.ACK
            wait_until(lambda: get_json(f"{http}/stats/telemetry.dlq")[1].get("messages") == 2, message="two dead letters")
            b.send_multipart(p.consume_frames(b"telemetry.dlq", b"g", 10))  # never acknowledges either
            wait_until(lambda: get_json(f"{http}/stats/telemetry.dlq.dlq")[1].get("messages") == 2, message="their dead letters")
            assert publish(dealer, 2, [2])[1] == p.ACK
            wait_until(lambda: get_json(f"{http}/stats/telemetry.dlq")[1].get("messages") == 3, message="the third dead letter")
            assert http_status(f"{http}/healthz") == 200 and proc.popen.poll() is None
        finally:
            a.close()
            b.close()
            ctx.term()


def test_memory_only_topics_together_keep_at_most_the_memory_budget(procs):
    """A peer that fills many memory-only topics cannot make the broker keep more than
    --max-memory-bytes of replay windows in total (each topic alone keeps up to 64 MiB)."""
    proc, url, http = start_broker("--max-memory-bytes=4MiB", "--max-topics=20")
    procs.append(proc)
    ctx = zmq.Context()
    dealer = dealer_socket(ctx, url)
    try:
        for t in range(10):
            for seq in range(4):  # ~0.5 MB a batch, ~2 MB a topic, ~20 MB in all
                assert publish(dealer, seq * 500, ["x" * 1000] * 500, topic=f"t{t}".encode())[1] == p.ACK
        topics = get_json(f"{http}/stats")[1]["topics"]
        held = sum(topic["memory"]["bytes"] for name, topic in topics.items() if name.startswith("t"))
        assert 0 < held <= 4 << 20, held
        assert topics["t9"]["memory"]["first_offset"] < 2000 == topics["t9"]["next_offset"]  # the newest topic keeps its latest batches
        assert publish(dealer, 0, [1])[1] == p.ACK  # and the broker keeps serving
    finally:
        dealer.close(linger=0)
        ctx.term()
