"""The broker's topics by name: opened at start (configured ones and those already on disk),
created on first use, each with its segmented log when persistence is on."""

from __future__ import annotations

import asyncio
import logging
import os

from common.names import valid_topic

from .config import Limits, PersistenceConfig
from .safefs import is_real_dir, make_private_dir
from .segmentlog import TopicLog
from .topic import MemoryBudget, Topic

log = logging.getLogger("broker")


class RegistryStartError(Exception):
    """The persistence directory cannot be used; the message is one line for the user."""


class TopicLimit(Exception):
    """--max-topics topics exist already."""


class TopicRegistry:
    def __init__(self, configured: tuple[str, ...], persistence: PersistenceConfig | None, limits: Limits = Limits()):
        self.configured = configured
        self.persistence = persistence
        self.limits = limits
        self.topics: dict[str, Topic] = {}
        self.memory = MemoryBudget(limits.max_memory_bytes, self.topics)  # memory-only topics' replay windows, together

    def open(self) -> None:
        """The configured topics, and every topic already in the persistence directory. Raises RegistryStartError."""
        names = list(self.configured)
        persistence = self.persistence
        if persistence is not None:
            try:
                make_private_dir(persistence.directory)
                names += sorted(n for n in os.listdir(persistence.directory) if valid_topic(n) and is_real_dir(os.path.join(persistence.directory, n)))
            except OSError as exc:
                raise RegistryStartError(
                    f"cannot use persistence directory {persistence.directory}: {_directory_problem(persistence.directory, exc)}"
                ) from None
        for name in dict.fromkeys(names):
            try:
                self._create(name)
            except OSError as exc:
                where = os.path.join(persistence.directory, name) if persistence else name
                raise RegistryStartError(f"cannot use persistence directory {where}: {_directory_problem(where, exc)}") from None

    def get(self, name: str) -> Topic | None:
        """The topic `name` (a valid name, see common.names), created on first use; None if its
        log cannot be created. Raises TopicLimit when --max-topics topics exist already."""
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.max_topics:
                raise TopicLimit()
            try:
                topic = self._create(name)
            except OSError as exc:
                log.error("Broker: cannot create the log of topic %r: %s", name, exc.strerror or exc)
                return None
            log.info("Broker: new topic %r", name)
        return topic

    def _create(self, name: str) -> Topic:
        persistence = self.persistence
        topic_log = None
        if persistence is not None:
            topic_log = TopicLog(
                os.path.join(persistence.directory, name),
                segment_bytes=persistence.segment_bytes,
                fsync=persistence.fsync,
                fsync_interval_s=persistence.fsync_interval_s,
                retention_bytes=persistence.retention_bytes,
                retention_age_s=persistence.retention_age_s,
            )
            topic_log.open()
            topic_log.background = in_thread
        topic = self.topics[name] = Topic(name, topic_log, self.limits.max_producers, self.memory)
        return topic

    def close(self) -> None:
        """Save every group's committed offset and close (fsync) every log."""
        for topic in self.topics.values():
            for group in topic.groups.values():
                group.save(force=True)
            if topic.log is not None:
                topic.log.close()


def in_thread(work) -> None:
    """Blocking housekeeping of a log, run in the event loop's default executor."""
    asyncio.get_running_loop().run_in_executor(None, work)


def _directory_problem(path: str, exc: OSError) -> str:
    """The real reason a directory cannot be made or used: the first existing part of the path
    that is not a directory or not writable, rather than a bare strerror about the whole path."""
    probe = os.path.abspath(path)
    while probe and not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.lexists(probe) and not os.path.isdir(probe):
        return f"{probe} exists and is not a directory"
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user (uid {os.getuid()})"
    reason = exc.strerror or str(exc)
    if exc.filename and os.path.abspath(exc.filename) != os.path.abspath(path):
        return f"{exc.filename}: {reason}"
    return reason
