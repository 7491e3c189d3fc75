"""Operations: /metrics agrees with /stats, JSON logs."""

import asyncio
import json
import signal
import urllib.request

from helpers import fake_broker, get_json, publish_numbered, start_broker, start_streamer, start_streamer_to, wait_until
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Consumer


def scrape(http: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{http}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_and_agree_with_stats(procs, tmp_path):
    proc, url, http = start_broker("--persistence", f"--persistence-dir={tmp_path}", "--fsync=always", "--ack-timeout=0.3s", "--max-deliveries=1")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 2500))

    async def leave_one_unacknowledged():
        consumer = Consumer(url, "telemetry", "g", credit=1)
        await consumer.start()
        async for _ in consumer:
            break
        # not acknowledged: past the ack timeout it is dead-lettered; leave before the next one is
        await asyncio.to_thread(wait_until, lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]["dead_lettered"] >= 1)
        await consumer.close()

    asyncio.run(leave_one_unacknowledged())
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]["consumers"] == 0)
    stats = get_json(f"{http}/stats/telemetry")[1]
    metrics = scrape(http)
    topic = (("topic", "telemetry"),)
    assert metrics[("telemetry_messages_accepted_total", topic)] == stats["messages"] == 2500
    assert metrics[("telemetry_bytes_accepted_total", topic)] == stats["bytes"]
    # 2,500 in batches of 100: at most one ACK each (batches sent back to back share one)
    assert metrics[("telemetry_acknowledgments_total", topic)] == stats["acknowledgments"] and 1 <= stats["acknowledgments"] <= 25
    assert metrics[("telemetry_log_bytes", topic)] == stats["persistence"]["bytes"]
    assert metrics[("telemetry_log_segments", topic)] == stats["persistence"]["segments"]
    assert metrics[("telemetry_group_lag", (("group", "g"), ("topic", "telemetry")))] == stats["groups"]["g"]["lag"]
    assert metrics[("telemetry_group_dead_lettered_total", (("group", "g"), ("topic", "telemetry")))] == stats["groups"]["g"]["dead_lettered"] >= 1
    assert metrics[("telemetry_fsync_seconds_count", ())] >= 1  # --fsync=always: every burst synced
    assert metrics[("telemetry_ack_latency_seconds_count", ())] >= 1


def test_json_logs_are_one_object_per_line(procs, sample_csv):
    proc, http = start_streamer(sample_csv, "--workers=2", "--rate=50", "--log-format=json")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 20)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    entries = [json.loads(line) for line in proc.lines]  # every line is JSON
    assert all({"time", "level", "component", "worker", "message"} <= set(e) for e in entries)
    assert {e["component"] for e in entries} == {"streamer", "worker"}
    assert {e["worker"] for e in entries if e["component"] == "worker"} == {0, 1}
    assert "published=" in entries[-1]["message"]


def test_readyz_fails_as_soon_as_a_drain_begins_while_healthz_holds_until_exit(procs, sample_csv):
    with fake_broker() as (router, url):  # accepts and never acknowledges: the drain lasts
        proc, http = start_streamer_to(url, sample_csv, "--rate=50", "--shutdown-timeout=4")
        procs.append(proc)
        assert get_json(f"{http}/readyz")[0] == 200 and get_json(f"{http}/healthz")[0] == 200
        assert router.poll(20_000)
        proc.signal(signal.SIGTERM)
        wait_until(lambda: get_json(f"{http}/readyz")[0] == 503, timeout=3, message="/readyz to fail at the drain's start")
        assert get_json(f"{http}/healthz")[0] == 200  # still alive while draining
        assert proc.popen.poll() is None
        assert proc.wait(timeout=30) == 1  # messages left unacknowledged


def test_one_scrape_shows_broker_and_workers(procs, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"gpu_id,active\n0,true\n1\n2,false\n")
    proc, http = start_streamer(str(path), "--workers=2", "--rate=100")
    procs.append(proc)
    metrics = wait_until(
        lambda: (
            (m := scrape(http)).get(("telemetry_worker_rows_skipped_total", (("reason", "field_count"), ("worker", "1"))))
            and m.get(("telemetry_worker_published_total", (("worker", "0"),)))
            and m
        ),
        message="both workers' metrics",
    )
    assert metrics[("telemetry_messages_accepted_total", (("topic", "telemetry"),))] > 0
    assert metrics[("telemetry_worker_restarts_total", (("worker", "0"),))] == 0
    assert metrics[("telemetry_worker_published_total", (("worker", "0"),))] > 0
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
