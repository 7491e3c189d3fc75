"""Consumer groups: acknowledged consumption, redelivery, dead letters, restarts, shared work."""

import asyncio
import json
import signal
import subprocess
import sys

import orjson
import zmq
from helpers import ROOT, dealer_socket, get_json, publish_numbered, start_broker, wait_until

from broker import protocol as p
from broker.client import BlockingConsumer, Consumer, Subscriber


async def take(consumer: Consumer, count: int, timeout: float = 30, ack: bool = True) -> list:
    got = []

    async def run():
        async for message in consumer:
            got.append(message)
            if ack:
                await consumer.ack(message.offset)
            if len(got) == count:
                return

    await asyncio.wait_for(run(), timeout)
    return got


def test_unacknowledged_message_is_delivered_again_after_the_timeout(procs):
    proc, url, http = start_broker("--ack-timeout=1s")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 1))

    async def scenario():
        consumer = Consumer(url, "telemetry", "g", credit=1)
        await consumer.start()
        first = await take(consumer, 1, ack=False)
        again = await take(consumer, 1)  # not acknowledged: it comes back
        await consumer.close()
        return first, again

    first, again = asyncio.run(scenario())
    assert first[0].offset == again[0].offset == 0
    assert (first[0].deliveries, again[0].deliveries) == (1, 2)
    stats = get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]
    assert stats["redelivered"] == 1 and stats["committed"] == 1 and stats["lag"] == 0


def test_dead_letter_after_max_deliveries(procs):
    proc, url, http = start_broker("--ack-timeout=0.3s", "--max-deliveries=2")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 3))

    async def scenario():
        consumer = Consumer(url, "telemetry", "g", credit=10)
        await consumer.start()
        seen = []

        async def never_ack():
            async for message in consumer:
                seen.append((message.offset, message.deliveries))

        reading = asyncio.create_task(never_ack())
        dlq = Subscriber(url, "telemetry.dlq", from_beginning=True)
        await dlq.start()
        letters = await asyncio.wait_for(collect_raw(dlq, 3), 30)
        reading.cancel()
        await consumer.close()
        await dlq.close()
        return seen, letters

    seen, letters = asyncio.run(scenario())
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    letters = [orjson.loads(m) for m in letters]
    assert [letter["offset"] for letter in letters] == [0, 1, 2]
    assert letters[0]["group"] == "g" and letters[0]["deliveries"] == 2 and "not acknowledged" in letters[0]["reason"]
    assert letters[0]["message"] == {"i": 0}
    stats = get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]
    assert stats["dead_lettered"] == 3 and stats["committed"] == 3


async def collect_raw(sub: Subscriber, count: int) -> list[bytes]:
    got = []
    async for _, message in sub:
        got.append(message)
        if len(got) == count:
            return got


def test_group_resumes_from_its_committed_offset_after_a_broker_restart(procs, tmp_path):
    args = ("--persistence", f"--persistence-dir={tmp_path}")
    proc, url, http = start_broker(*args)
    procs.append(proc)
    asyncio.run(publish_numbered(url, 100))

    async def consume(url, count):
        consumer = Consumer(url, "telemetry", "billing", credit=5)
        await consumer.start()
        got = await take(consumer, count)
        await consumer.close()
        return got

    first = asyncio.run(consume(url, 40))
    assert [m.offset for m in first] == list(range(40))
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["billing"]["committed"] == 40, message="the last acknowledgments")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert (tmp_path / "telemetry" / "groups" / "billing").exists()

    proc, url, http = start_broker(*args)
    procs.append(proc)
    second = asyncio.run(consume(url, 60))
    assert [m.offset for m in second] == list(range(40, 100))  # from the committed offset, nothing lost
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["billing"]["committed"] == 100, message="the last acknowledgments")


def test_two_consumers_in_one_group_share_the_work(procs):
    proc, url, http = start_broker()
    procs.append(proc)
    asyncio.run(publish_numbered(url, 1000))

    async def scenario():
        a, b = Consumer(url, "telemetry", "workers", credit=10), Consumer(url, "telemetry", "workers", credit=10)
        await a.start()
        await b.start()
        got = {"a": [], "b": []}

        async def work(name, consumer):
            async for message in consumer:
                got[name].append(message.offset)
                await consumer.ack(message.offset)
                await asyncio.sleep(0)  # a little work, so that both get a share

        tasks = [asyncio.create_task(work("a", a)), asyncio.create_task(work("b", b))]
        while len(got["a"]) + len(got["b"]) < 1000:
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await a.close()
        await b.close()
        return got

    got = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert sorted(got["a"] + got["b"]) == list(range(1000))  # every message once: no loss, no double delivery
    assert got["a"] and got["b"]
    stats = get_json(f"{http}/stats/telemetry")[1]["groups"]["workers"]
    assert stats["committed"] == 1000 and stats["redelivered"] == 0


def test_tail_with_a_group_acknowledges_what_it_printed(procs):
    proc, url, http = start_broker()
    procs.append(proc)
    asyncio.run(publish_numbered(url, 10))
    for expected in ([0, 1, 2, 3], [4, 5, 6, 7]):
        result = subprocess.run(
            [sys.executable, "-m", "broker", "tail", f"--broker-url={url}", "--group=audit", "--count=4"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["i"] for line in result.stdout.splitlines()] == expected


def test_blocking_consumer(procs):
    proc, url, _ = start_broker()
    procs.append(proc)
    asyncio.run(publish_numbered(url, 5))
    with BlockingConsumer(url, "telemetry", "sync") as consumer:
        offsets = []
        for message in consumer:
            offsets.append(message.offset)
            consumer.ack(message.offset)
            if len(offsets) == 5:
                break
    assert offsets == [0, 1, 2, 3, 4]


def test_acknowledgments_for_messages_waiting_for_redelivery_still_count():
    """In process: a member acknowledges, then leaves (or its acks are late) before the broker
    applied the acks: what it acknowledged is done, not delivered again."""
    from broker.groups import ACKED, FOREIGN, UNKNOWN, Delivery, Group, GroupMember

    group = Group("g", committed=0, next_offset=4)
    group.members[b"m"] = GroupMember(b"m", credit=4, holding=4)
    for offset in range(4):
        group.inflight[offset] = Delivery(offset, b"{}", b"p" * 16, offset, 0, deliveries=1, member=b"m")
    assert group.acknowledge(0, b"m") == ACKED
    group.remove_member(b"m")  # the rest goes back to the group...
    assert group.acknowledge(1, b"other") == FOREIGN  # ...which only the member it was delivered to may acknowledge
    for offset in (1, 2):
        assert group.acknowledge(offset, b"m") == ACKED  # ...and its acknowledgments were already on their way
    assert group.committed == 3 and [d.offset for d in group.retry] == [3]
    assert group.acknowledge(1, b"m") == UNKNOWN  # acknowledged twice: counted once


def test_a_consumer_that_acknowledges_and_closes_at_once_keeps_its_acknowledgments(procs):
    """Over the wire: consumers that send their acknowledgments and disconnect at once (no LEAVE).
    The broker may notice a disconnection while its acknowledgments are still queued (a send to
    the consumer fails and what it held goes back to the group): they must still count, so an
    acknowledged message is never delivered again, and the group ends fully committed."""
    proc, url, http = start_broker("--ack-timeout=1s")
    procs.append(proc)
    asyncio.run(publish_numbered(url, 100))
    ctx = zmq.Context()
    acknowledged: set[int] = set()
    try:
        for _ in range(40):
            if len(acknowledged) == 100:
                break
            consumer = dealer_socket(ctx, url, timeout_ms=3000)
            consumer.send_multipart(p.consume_frames(b"telemetry", b"g", 20))
            offsets = []
            while len(offsets) < 20 and consumer.poll(3000 if not offsets else 200):
                offsets.append(p.MSG_HEADER.unpack(consumer.recv_multipart()[4])[0])
            for offset in offsets:
                assert offset not in acknowledged, f"offset {offset} was acknowledged, yet delivered again"
                consumer.send_multipart(p.group_ack_frames(b"telemetry", b"g", [offset]))
            acknowledged.update(offsets)
            consumer.close(linger=1000)  # the acknowledgments leave, then the connection closes
            first_unacknowledged = min(set(range(101)) - acknowledged)
            wait_until(
                lambda: get_json(f"{http}/stats/telemetry")[1]["groups"]["g"]["committed"] == first_unacknowledged,  # noqa: B023
                timeout=10,
                message=f"the acknowledgments up to offset {first_unacknowledged} applied",
            )
    finally:
        ctx.destroy(linger=0)
    assert acknowledged == set(range(100))
