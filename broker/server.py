"""The broker: its parts wired together, and its life as a short story (uvicorn's Server.serve).

    part                       module                     holds
    ZeroMQ transport           broker.transport           ROUTER socket, receive loop (bursts), send, connection monitor
    frame checks, dispatch     broker.dispatch            every field range-checked; frame type -> handler; bad-frame counts
    producers' batches         broker.ingest              append, ACK merging per burst, replies once durable
    fsync policy               broker.storage             --fsync always/interval (the periodic sync task)
    segmented log, retention   broker.segmentlog          the bytes on disk, recovery, --retention-*
    topics                     broker.registry, .topic    topics by name; one topic's offsets, producers, de-duplication
    live subscriptions, replay broker.subscriptions       DELIVER with credit, SSE queues
    consumer groups            broker.group_coordinator   hand-out, acks, the redelivery timer, dead letters (state: .groups)
    stats, metrics, HTTP       broker.stats, .metrics, .http

    await broker.run(should_exit)    # or, embedded: start(), then drain() and close() when the host stops

`start()` binds both sockets and starts the tasks, each supervised: one that ends unexpectedly
has its traceback logged, /healthz turns 503 and the broker stops (`run` raises BrokerFailed, so
the process exits non-zero and its supervisor restarts it); `drain()` says that shutdown has begun
(readiness turns 503, producers are still served so they can flush); `close()` stops receiving,
tells subscribers, SSE streams and group consumers that the broker is going away, makes the logs
and groups' offsets safe and closes the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.httpauth import HttpSecurityError

from . import host
from .config import BrokerConfig
from .dispatch import FrameDispatcher
from .group_coordinator import GroupCoordinator
from .ingest import Ingest
from .metrics import Metrics
from .registry import RegistryStartError, TopicRegistry
from .stats import BrokerStats
from .storage import FsyncPolicy
from .subscriptions import Subscription, Subscriptions
from .throttle import LogThrottle
from .topic import Span, Topic
from .transport import Transport, TransportStartError

log = logging.getLogger("broker")

HTTP_SHUTDOWN_TIMEOUT_S = 2.0  # an HTTP handler still busy this long after close (a stuck SSE client) is cancelled


PRODUCER_EXPIRY_CHECK_S = 10.0  # how often idle producers are looked for (at most; less if --producer-expiry is short)


class BrokerStartError(Exception):
    """The broker cannot start (address in use, bad address, unusable directory); the message is one line for the user."""


class BrokerFailed(Exception):
    """One of the broker's tasks ended unexpectedly (its traceback is logged); the broker stopped."""


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.draining = False
        self.failure: str | None = None  # set when a supervised task ended unexpectedly
        self.failed = asyncio.Event()
        self.on_failure = None  # called (no arguments) when a task fails, e.g. the embedding process's stop
        self.http_url = ""
        self._http = None
        self._tasks: list[asyncio.Task] = []
        throttle = LogThrottle()
        self.metrics = Metrics(self)
        self.registry = TopicRegistry(config.topics, config.persistence, config.limits)
        self.transport = Transport(config, throttle)
        self.fsync = FsyncPolicy(self.registry.topics, self.metrics.fsync_seconds)
        self.subscriptions = Subscriptions(config, self.transport)
        self.groups = GroupCoordinator(config, self.registry, self.transport, self._on_durable)
        self.ingest = Ingest(self.transport, self.fsync, self.metrics.burst_seconds, self._on_durable)
        self.dispatcher = FrameDispatcher(config, self.registry, self.ingest, self.subscriptions, self.groups, throttle)
        self.statistics = BrokerStats(self.registry.topics, self.transport, self.dispatcher)

    def _on_durable(self, topic: Topic, span: Span) -> None:
        """A durable span reaches the topic's live subscriptions and its groups."""
        if topic.subscriptions:
            self.subscriptions.fan_out(topic, span)
        if topic.groups:
            self.groups.dispatch_all(topic)

    # -- the story -----------------------------------------------------------------------------

    async def run(self, should_exit: asyncio.Event) -> None:
        """Start, serve until `should_exit` is set (or a task fails), drain, close. Raises BrokerFailed."""
        await self.start()
        stopping = asyncio.create_task(should_exit.wait())
        failing = asyncio.create_task(self.failed.wait())
        await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        failing.cancel()
        self.drain()
        await self.close()
        if self.failure is not None:
            raise BrokerFailed(self.failure)

    async def start(self) -> None:
        """Bind ZeroMQ and HTTP (port 0 picks a free port) and start serving."""
        from .http import start_http  # aiohttp is only needed once a broker starts

        cfg = self.config
        host.raise_open_files_limit()
        host.keep_freed_memory()
        try:
            self.registry.open()
            self.transport.bind()
        except (RegistryStartError, TransportStartError) as exc:
            self.registry.close()
            raise BrokerStartError(str(exc)) from None
        try:
            self._http, self.http_url = await start_http(self, cfg.http_host, cfg.http_port, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT_S)
        except HttpSecurityError as exc:
            await self.close()
            raise BrokerStartError(str(exc)) from None
        except OSError as exc:
            await self.close()
            raise BrokerStartError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: {exc.strerror or exc}") from None
        self._supervise("receive", self.transport.receive(self.dispatcher.handle, self.ingest.commit))
        self._supervise("rates", self.statistics.sample_rates())
        self._supervise("redelivery", self.groups.expire_deliveries())
        self._supervise("connections", self.transport.watch_connections())
        self._supervise("idle subscriptions", self.subscriptions.expire_idle(self.registry.topics))
        if cfg.limits.producer_expiry_s is not None:
            self._supervise("producer expiry", self._expire_producers(cfg.limits.producer_expiry_s))
        if cfg.persistence is not None and cfg.persistence.fsync == "interval":
            self._supervise("fsync", self.fsync.sync_periodically(cfg.persistence.fsync_interval_s))
        log.info(
            "Broker listening: ZeroMQ %s, HTTP %s (stats at %s/stats/%s)",
            self.zmq_url,
            self.http_url,
            self.http_url,
            cfg.topics[0] if cfg.topics else "<topic>",
        )

    def _supervise(self, name: str, coroutine) -> None:
        """Run a task that should run until close; if it ends otherwise, the broker fails."""
        task = asyncio.create_task(coroutine, name=f"broker {name}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task not in self._tasks:
            return  # closing
        exc = task.exception()
        log.critical("Broker: task %r ended unexpectedly; the broker stops", task.get_name(), exc_info=exc)
        if self.failure is None:
            self.failure = f"task {task.get_name()!r} ended: {exc!r}"
            self.failed.set()
            if self.on_failure is not None:
                self.on_failure()

    async def _expire_producers(self, expiry_s: float) -> None:
        """Forget producers idle longer than --producer-expiry (see Topic.expire_producers)."""
        while True:
            await asyncio.sleep(min(PRODUCER_EXPIRY_CHECK_S, expiry_s / 4))
            idle_before = time.time() - expiry_s
            for topic in list(self.registry.topics.values()):
                if topic.expire_producers(idle_before):
                    log.debug("Broker: topic %r forgot idle producers", topic.name)

    def drain(self) -> None:
        """Shutdown has begun: readiness fails from now on, but producers are still served."""
        self.draining = True

    async def close(self) -> None:
        """Shutdown, in order, each step bounded:
        1. stop receiving and stop the timers (no frame is half handled: bursts end in commit);
        2. tell every subscription and group member that the broker is going away (SSE streams
           end with `event: shutdown`, ZeroMQ peers get CLOSING);
        3. close HTTP (its SSE handlers have returned; a stuck one is cancelled after HTTP_SHUTDOWN_TIMEOUT_S);
        4. save groups' committed offsets and fsync and close the logs;
        5. close the ZeroMQ socket (the goodbyes get a moment to leave)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        topics = self.registry.topics
        await self.subscriptions.close_all(topics)
        self.groups.close_all(topics)
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        self.registry.close()
        self.transport.close()

    # -- the embedding API (broker.http, streamer.supervisor) ----------------------------------

    @property
    def zmq_url(self) -> str:
        return self.transport.url

    @property
    def topics(self) -> dict[str, Topic]:
        return self.registry.topics

    @property
    def bad_frames(self):
        return self.dispatcher.bad_frames

    @property
    def workers_stats(self) -> tuple[str, object] | None:
        """(topic, callable): the embedded streamer's workers, shown in /stats and /stats/<topic>."""
        return self.statistics.workers

    @workers_stats.setter
    def workers_stats(self, value: tuple[str, object] | None) -> None:
        self.statistics.workers = value

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.statistics.healthy()

    def local_endpoint(self) -> str:
        return self.transport.local_endpoint()

    def local_client_keys(self):
        """With CURVE, the key pair this process's own workers connect with (broker.curve.ClientKeys); else None."""
        return self.transport.local_client_keys()

    def reload_keys(self) -> None:
        """Read the CURVE authorized keys again (the standalone broker does on SIGHUP)."""
        self.transport.reload_keys()

    def stats(self) -> dict:
        return self.statistics.stats()

    def topic_stats(self, name: str) -> dict | None:
        return self.statistics.topic_stats(name)

    def sse_allowed(self) -> bool:
        return self.subscriptions.sse_allowed()

    def add_sse_subscriber(self, topic: Topic) -> Subscription:
        return self.subscriptions.add_sse(topic)

    def remove_subscriber(self, topic: Topic, sub: Subscription) -> None:
        self.subscriptions.unsubscribe(topic, sub.key)
