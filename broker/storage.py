"""What decides when a topic's log is fsynced (the --fsync policy), around broker.segmentlog:

    always    before a burst's acknowledgments go out, one fsync per written log, off the event
              loop (due_for_acks, then sync_for_acks; the receive loop waits, other tasks run)
    interval  at most every --fsync-interval, off the event loop (sync_periodically, a task)
    never     the page cache decides (and close)

Retention (--retention-bytes, --retention-age) is the log's own: `TopicLog.enforce_retention`,
run whenever a segment rolls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable

from .segmentlog import LogUnavailable
from .topic import Topic

log = logging.getLogger("broker")


class FsyncPolicy:
    def __init__(self, topics: dict[str, Topic], fsync_seconds):
        self.topics = topics
        self.fsync_seconds = fsync_seconds  # a Histogram: how long each fsync took

    @staticmethod
    def due_for_acks(topics: Iterable[Topic]) -> list[Topic]:
        """The topics whose log --fsync=always wants synced before their acknowledgments go out."""
        return [t for t in topics if t.log is not None and t.log.fsync == "always" and t.log.dirty]

    async def sync_for_acks(self, due: list[Topic]) -> set[int]:
        """fsync these topics' logs off the event loop; returns the ids of the topics whose log
        could not be synced (their acks become NACKs)."""
        loop = asyncio.get_running_loop()
        failed: set[int] = set()
        for topic in due:
            try:
                with self.fsync_seconds.time():
                    await loop.run_in_executor(None, topic.log.sync)
            except LogUnavailable:
                failed.add(id(topic))
        return failed

    def _until_next_sync(self, interval: float) -> float:
        """Seconds until the first written log is due. A log written after this is computed is
        due `interval` after its last fsync at the earliest, so sleeping at most `interval` never
        leaves it unsynced for longer: one wake-up per interval, not a poll."""
        now = time.monotonic()
        due = [t.log.last_fsync + interval - now for t in self.topics.values() if t.log is not None and t.log.dirty]
        return max(min(interval, 0.1), min(due, default=interval))  # a log whose fsync failed is retried, not spun on

    async def sync_periodically(self, interval: float) -> None:
        """--fsync=interval: fsync each written log at most every interval, off the event loop
        (a duplicate descriptor, so that a segment roll may close the original meanwhile)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._until_next_sync(interval))
            for topic in list(self.topics.values()):
                topic_log = topic.log
                if topic_log is None or not topic_log.sync_due():
                    continue
                fd = os.dup(topic_log.active.fd)
                topic_log.dirty = False
                try:
                    with self.fsync_seconds.time():
                        await loop.run_in_executor(None, os.fdatasync, fd)
                    topic_log.last_fsync = time.monotonic()
                except OSError as exc:
                    topic_log.dirty = True
                    log.error("Log %s: fsync failed: %s", topic_log.directory, exc.strerror)
                finally:
                    os.close(fd)
