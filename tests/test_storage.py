"""When logs are fsynced: before the acknowledgments under --fsync=always, within the interval under
--fsync=interval. In process, observing the real log's syncs and the broker's sends (a kill -9
keeps the page cache, so only the order in the process shows an acknowledgment that went early)."""

import asyncio
import os

from helpers import PRODUCER

from broker import protocol as p
from broker.config import BrokerConfig, PersistenceConfig
from broker.server import Broker


def embedded_broker(tmp_path, fsync: str, interval_s: float = 1.0) -> Broker:
    persistence = PersistenceConfig(directory=str(tmp_path), fsync=fsync, fsync_interval_s=interval_s)
    broker = Broker(BrokerConfig(topics=("telemetry",), persistence=persistence))
    broker.registry.open()
    return broker


def publish_frames(identity: bytes, first_seq: int, count: int) -> list[bytes]:
    body = b"\n".join(b'{"v":%d}' % i for i in range(count))
    return [identity, *p.publish_frames(b"telemetry", PRODUCER, first_seq, count, body)]


def test_acknowledgments_go_out_only_after_the_fsync_under_fsync_always(tmp_path):
    broker = embedded_broker(tmp_path, "always")
    events = []
    topic_log = broker.topics["telemetry"].log
    real_sync = topic_log.sync

    def sync():
        real_sync()
        events.append(("fsync", topic_log.dirty))

    topic_log.sync = sync
    broker.transport.send = lambda identity, frames: events.append(("send", frames[1]))
    for burst in ((0, 10), (10, 5)):
        broker.dispatcher.handle(publish_frames(b"a", *burst))
        broker.dispatcher.handle(publish_frames(b"b", burst[0] + 1000, 1))  # another producer's gap: a NACK in the same burst
        asyncio.run(broker.ingest.commit())  # a coroutine: the fsync runs off the event loop
    assert events == [("fsync", False), ("send", p.ACK), ("send", p.NACK)] * 2
    broker.registry.close()


def test_fsync_interval_syncs_a_written_log_within_the_interval(tmp_path, monkeypatch):
    broker = embedded_broker(tmp_path, "interval", interval_s=0.05)
    topic_log = broker.topics["telemetry"].log
    synced = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    broker.transport.send = lambda identity, frames: None
    active_inode = os.fstat(topic_log.active.fd).st_ino

    async def scenario():
        task = asyncio.create_task(broker.fsync.sync_periodically(0.05))
        await asyncio.sleep(0.3)
        idle = list(synced)  # nothing written yet: nothing to sync
        broker.dispatcher.handle(publish_frames(b"a", 0, 10))
        broker.ingest.commit()  # --fsync=interval: the acknowledgment does not wait for a sync
        assert topic_log.dirty
        for _ in range(100):
            if synced:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # and a clean log is not synced again
        task.cancel()
        return idle

    idle = asyncio.run(scenario())
    assert idle == []
    assert synced == [active_inode]
    assert not topic_log.dirty and topic_log.stats()["since_last_fsync_s"] < 1
    broker.registry.close()
