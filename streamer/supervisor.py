"""The streamer's parent process: the embedded broker, the worker processes, and the drain.

    start   bind the embedded broker (unless --broker-url), spawn N worker processes
    run     until SIGINT/SIGTERM: watch workers, restart one that dies (with backoff)
    drain   readiness fails; workers get SIGTERM, stop reading, flush until acknowledged
            (bounded by --shutdown-timeout) and report their final counts
    close   stop the broker; log the summary: published=<total> and per-worker counts

Signal handlers only flip state: the first asks for a drain, a second forces an immediate exit
(workers are killed). Workers never outlive this process (PR_SET_PDEATHSIG, see worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib.machinery import ModuleSpec

import orjson

from broker.server import Broker, BrokerStartError
from common.httpauth import HttpSecurityError

from . import forkserver, health, workerproc
from .config import StreamerConfig

log = logging.getLogger("streamer")

DRAIN_GRACE_S = 5.0  # beyond --shutdown-timeout, before a worker that has not exited is killed
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
# A signal this soon after the first is the same request: `timeout` and some process managers
# signal the process and then its group, so one stop arrives twice within microseconds.
SIGNAL_DEBOUNCE_S = 0.5
ANCHOR_LEAD_NS = 500_000_000  # --pace=timestamps: the first row is due this long after the start
PROGRESS_REFRESH_S = 0.5
CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW_S = 5, 60.0  # more restarts than this within the window: give up


_COUNTER = {key: i for i, key in enumerate(workerproc.COUNTERS)}


@dataclass
class WorkerSlot:
    """One worker index and the process currently filling it; counts survive restarts."""

    index: int
    replay: bool = False  # its worker runs a replay (passes, read)
    process: multiprocessing.process.BaseProcess | None = None
    conn: object = None
    counters: object = None  # the current process's live counts (workerproc.COUNTERS), memory shared with it
    status: dict = field(default_factory=dict)  # latest status from the current process (skipped, finished, failed, profile)
    before: Counter = field(default_factory=Counter)  # COUNTS of earlier processes of this slot
    skipped_before: Counter = field(default_factory=Counter)
    restarts: int = 0
    restart_times: list = field(default_factory=list)
    given_up: bool = False
    finished: bool = False  # read its read-once input to the end, or its --passes, and drained: not restarted
    passes: int = 0  # passes completed by earlier processes of this slot
    rows_per_pass: int = 0
    failed: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    # status counts summed over the slot's processes; `unconfirmed`: what a crashed process held
    # unacknowledged (it may or may not have been stored), kept apart from a drain's `unacked`
    COUNTS = ("sent", "published", "unacked", "lost_by_broker", "unconfirmed", "read")

    def live(self, key: str) -> int:
        """The current process's count (0 before it counted anything, or once it has exited)."""
        i = _COUNTER.get(key)
        return self.counters[i] if i is not None and self.counters is not None else 0

    def total(self, key: str) -> int:
        return self.before[key] + self.live(key)

    def retire(self, crashed: bool = False) -> None:
        """The current process has exited: keep its counts (as it last wrote them), forget its
        status (the passes it completed stay, so a restarted process continues from there)."""
        live = {key: self.live(key) for key in workerproc.COUNTERS}
        if crashed:
            live["unconfirmed"] = live.pop("unacked")
        self.passes = max(self.passes, live["passes"])
        self.rows_per_pass = live["rows_per_pass"] or self.rows_per_pass
        for key in self.COUNTS:
            self.before[key] += live.get(key, 0)
        self.skipped_before.update(self.status.get("skipped", {}))
        self.status = {}
        if self.counters is not None:
            self.counters[:] = [0] * len(workerproc.COUNTERS)

    published = property(lambda self: self.total("published"))
    sent = property(lambda self: self.total("sent"))
    unacked = property(lambda self: self.total("unacked"))
    lost_by_broker = property(lambda self: self.total("lost_by_broker"))
    unconfirmed = property(lambda self: self.total("unconfirmed"))
    read = property(lambda self: self.total("read"))

    @property
    def skipped(self) -> dict:
        return dict(self.skipped_before + Counter(self.status.get("skipped", {})))

    def stats(self) -> dict:
        """This worker in /stats: its counts over every process that filled the slot."""
        running = self.process is not None and not self.exited.is_set()
        return {
            "pid": self.process.pid if running else None,
            "running": running,
            "restarts": self.restarts,
            "given_up": self.given_up,
            "sent": self.sent,
            "published": self.published,
            "unacknowledged": self.unacked,
            "lost_by_broker": self.lost_by_broker,
            "skipped": self.skipped,
        } | self._replay_stats()

    def _replay_stats(self) -> dict:
        extra = {}
        if self.unconfirmed:
            extra["unconfirmed"] = self.unconfirmed
        if self.replay:
            extra["passes"] = max(self.passes, self.live("passes"))
        if "profile" in self.status:
            extra["profile"] = self.status["profile"]
        return extra


class Supervisor:
    def __init__(self, cfg: StreamerConfig):
        # first: the fork server may be a fork of this process, taken (and its objects frozen)
        # before this one holds anything (streamer.forkserver)
        self._mp = worker_context()
        self.cfg = cfg
        self.broker: Broker | None = None
        self.slots = [WorkerSlot(i, replay=cfg.worker.replay.active) for i in range(cfg.workers)]
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.reload_keys = asyncio.Event()  # SIGHUP, with the embedded broker's CURVE: reread its authorized keys
        self.draining = False
        self._first_signal_at = 0.0
        self.registry = health.new_registry(self)  # the workers' metrics
        self._health = None  # the streamer's own HTTP, when the broker is not embedded
        self.completed = False  # every worker finished on its own (passes, profile, read-once input)
        self._started_at = time.monotonic()
        self._worker_cfg = cfg.worker
        self.stream_monitor = None  # with NATS: the stream's state for /stats and /metrics

    # -- signals only flip state -------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if not self.should_exit.is_set():
            self._first_signal_at = now
            self.should_exit.set()
        elif now - self._first_signal_at >= SIGNAL_DEBOUNCE_S:
            self.force_exit.set()

    # -- the story ---------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.cfg.broker is not None and self.cfg.broker.curve is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload_keys.set)
        await self._start()
        reloading = asyncio.create_task(self._reload_keys_on_sighup())
        progress = asyncio.create_task(self._show_progress()) if self.cfg.progress else None
        await self.should_exit.wait()
        reloading.cancel()
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        if not self.completed:
            log.info("Shutdown requested: draining %d workers (timeout %.1f s)", len(self.slots), self._worker_cfg.shutdown_timeout)
        forced = await self._drain()
        return await self._close(forced)

    async def _reload_keys_on_sighup(self) -> None:
        while True:
            await self.reload_keys.wait()
            self.reload_keys.clear()
            self.broker.reload_keys()

    async def _start(self) -> None:
        cfg = self.cfg
        if cfg.broker is not None:
            self.broker = Broker(cfg.broker)
            self.broker.on_failure = self.should_exit.set  # a broker task died: drain and exit non-zero
            await self.broker.start()  # raises BrokerStartError before any worker exists
            # the workers reach the embedded broker over a Unix socket: ~5-10% more messages
            # per CPU second than TCP loopback (docs/DESIGN.md)
            # with CURVE they connect with a key pair made now and allowed in memory only
            self._worker_cfg = replace(cfg.worker, broker_url=self.broker.local_endpoint(), curve=self.broker.local_client_keys())
            self.broker.metrics.registry.register(health.WorkerCollector(self))  # one scrape: broker and workers
            self.broker.workers_stats = (self._worker_cfg.topic, self.worker_stats)  # and one /stats
        else:
            if cfg.worker.nats is not None:
                await self._prepare_nats()
            try:
                self._health, url = await health.start_health(self, cfg.http_host, cfg.http_port, cfg.http_security)
            except HttpSecurityError as exc:
                raise BrokerStartError(str(exc)) from None
            except OSError as exc:
                raise BrokerStartError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: {exc.strerror or exc}") from None
            log.info("Streamer HTTP %s (/healthz, /readyz, /metrics)", url)
        # every worker's schedule (--pace=timestamps) and shifted timestamps start from one wall
        # time; paced workers get a moment to start and read the file first
        lead_ns = ANCHOR_LEAD_NS if self._worker_cfg.replay.pace == "timestamps" else 0
        self._worker_cfg = replace(self._worker_cfg, anchor_ns=time.time_ns() + lead_ns)
        self._started_at = time.monotonic()
        w = self._worker_cfg
        rate = f"{w.rate:g} messages/s per worker" if w.rate > 0 else "unthrottled"
        target = f"NATS {w.nats.connection.shown}, stream {w.nats.stream}" if w.nats else f"broker {w.broker_url}"
        log.info("Starting %d workers, %s, topic %r, %s", cfg.workers, rate, w.topic, target)
        for slot in self.slots:
            self._spawn(slot)

    async def _prepare_nats(self) -> None:
        """Check the servers and the stream before any worker starts; watch the stream for /stats."""
        from .destinations import DestinationError
        from .destinations.nats import StreamMonitor, prepare

        try:
            largest = await prepare(self._worker_cfg)
        except DestinationError as exc:
            raise BrokerStartError(str(exc)) from None
        if self._worker_cfg.max_message_bytes > largest:
            log.info("Messages over %d bytes are skipped: the NATS servers' max_payload, less the message id header", largest)
            self._worker_cfg = replace(self._worker_cfg, max_message_bytes=largest)
        self.stream_monitor = StreamMonitor(self._worker_cfg)
        await self.stream_monitor.start()
        await self.stream_monitor.refresh()
        self.registry.register(health.StreamCollector(self.stream_monitor))
        self._stream_refresh = asyncio.create_task(self._refresh_stream_state())

    async def _refresh_stream_state(self) -> None:
        """The stream's state for /metrics, read once a second (a scrape never waits on NATS)."""
        while True:
            await asyncio.sleep(1.0)
            await self.stream_monitor.refresh()

    def worker_stats(self) -> dict:
        return {str(slot.index): slot.stats() for slot in self.slots}

    def _spawn(self, slot: WorkerSlot) -> None:
        receiver, sender = self._mp.Pipe(duplex=False)
        if slot.counters is None:  # one per slot: a restarted process counts from 0 in it again (retire)
            slot.counters = self._mp.RawArray("q", len(workerproc.COUNTERS))
        args = (self._worker_cfg, slot.index, sender, slot.counters, _InheritedFd(0) if "-" in self._worker_cfg.csv else None, slot.passes, os.getpid())
        # (stdin: the CSV comes from our standard input; passes: a restarted worker continues after them)
        process = self._mp.Process(target=workerproc.main, args=args, name=f"worker-{slot.index}", daemon=False)
        with _main_script_not_rerun():
            process.start()
        sender.close()
        slot.process, slot.conn, slot.status = process, receiver, {}
        slot.exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(receiver.fileno(), self._read_status, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)

    def _read_status(self, slot: WorkerSlot) -> None:
        """The pipe is readable: one status (written at once, it is there whole; another one
        waiting calls this again), or the end (the worker exited)."""
        try:
            slot.status = orjson.loads(slot.conn.recv_bytes())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())

    def _read_final_status(self, slot: WorkerSlot) -> None:
        """After the worker exited: whatever it sent last (its final status, if it sent one)."""
        conn = slot.conn
        try:
            while conn.poll():
                slot.status = orjson.loads(conn.recv_bytes())
        except (EOFError, OSError):
            pass

    def _on_exit(self, slot: WorkerSlot) -> None:
        loop = asyncio.get_running_loop()
        process = slot.process
        loop.remove_reader(process.sentinel)
        process.join()
        self._read_final_status(slot)
        loop.remove_reader(slot.conn.fileno())
        slot.conn.close()
        slot.exited.set()
        if self.draining:
            return
        if slot.status.get("finished") and process.exitcode == 0:  # its read-once input, or its passes, are done
            slot.finished, slot.failed = True, bool(slot.status.get("failed"))
            slot.retire()
            if all(s.finished or s.given_up for s in self.slots):
                self.completed = True
                log.info("Every worker is done (%s): stopping", self._what_is_done())
                self.should_exit.set()
            return
        slot.retire(crashed=True)
        now = time.monotonic()
        slot.restart_times = [t for t in slot.restart_times if now - t < CRASH_LOOP_WINDOW_S] + [now]
        if len(slot.restart_times) > CRASH_LOOP_RESTARTS:
            slot.given_up = True
            log.error(
                "Worker %d exited unexpectedly (exit code %s) %d times within %.0f s: giving up on it",
                slot.index,
                process.exitcode,
                len(slot.restart_times),
                CRASH_LOOP_WINDOW_S,
            )
            if all(s.given_up for s in self.slots):
                log.error("Every worker is in a crash loop: stopping")
                self.should_exit.set()
            return
        slot.restarts += 1
        delay = min(RESTART_MIN_S * 2 ** (len(slot.restart_times) - 1), RESTART_MAX_S)
        log.error("Worker %d exited unexpectedly (exit code %s); restarting in %.0f s", slot.index, process.exitcode, delay)
        loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: WorkerSlot) -> None:
        if not self.draining:
            self._spawn(slot)

    async def _drain(self) -> bool:
        """Ask every worker to drain and wait for them; returns True if the exit was forced."""
        self.draining = True
        if self.broker is not None:
            self.broker.drain()
        live = [s for s in self.slots if s.process is not None and not s.exited.is_set()]
        for slot in live:
            _signal(slot.process, signal.SIGTERM)
        deadline = self._worker_cfg.shutdown_timeout + DRAIN_GRACE_S
        all_exited = asyncio.ensure_future(asyncio.gather(*(s.exited.wait() for s in live)))
        forced = asyncio.ensure_future(self.force_exit.wait())
        done, _ = await asyncio.wait({all_exited, forced}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (all_exited, forced):
            waiter.cancel()
        await asyncio.gather(all_exited, forced, return_exceptions=True)
        if all_exited not in done:
            stragglers = [s for s in live if not s.exited.is_set()]
            why = "second signal" if self.force_exit.is_set() else f"still running {deadline:.0f} s after the drain began"
            log.error("Killing %d workers (%s)", len(stragglers), why)
            for slot in stragglers:
                _signal(slot.process, signal.SIGKILL)
            await asyncio.gather(*(s.exited.wait() for s in stragglers))
            return True
        return False

    def _what_is_done(self) -> str:
        replay = self._worker_cfg.replay
        if replay.passes:
            return f"{replay.passes} pass{'' if replay.passes == 1 else 'es'}"
        if replay.profile is not None:
            return "the profile"
        return "every input read to its end"

    async def _show_progress(self) -> None:
        """A progress bar on the terminal (stderr): messages sent of the total when --passes
        gives one, the rate, and the time left."""
        from tqdm import tqdm

        passes = self._worker_cfg.replay.passes
        # a terminal that reports no size (0 x 0) would hide the bar: it gets 80 x 24
        try:
            sized = os.get_terminal_size(sys.stderr.fileno()).lines > 0
        except OSError:
            sized = False
        bar = tqdm(unit=" msg", unit_scale=True, dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24, leave=False, mininterval=0.5)
        try:
            while True:
                await asyncio.sleep(PROGRESS_REFRESH_S)
                per_pass = [s.live("rows_per_pass") or s.rows_per_pass for s in self.slots]
                if passes and all(per_pass) and bar.total is None:
                    bar.total = sum(per_pass) * passes
                bar.update(sum(s.sent for s in self.slots) - bar.n)
        finally:
            bar.close()

    def _completion_summary(self) -> str:
        """One line for a run that ends on its own (--passes, a --profile, read-once inputs)."""
        duration = time.monotonic() - self._started_at
        sent = sum(s.sent for s in self.slots)
        skipped = Counter()
        for s in self.slots:
            skipped.update(s.skipped)
        shown = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items())) or "none"
        return (
            f"Completed {self._what_is_done()} in {duration:.1f} s: read={sum(s.read for s in self.slots) or sent} sent={sent}"
            f" acknowledged={sum(s.published for s in self.slots)} unacknowledged={sum(s.unacked for s in self.slots)}"
            f" unconfirmed={sum(s.unconfirmed for s in self.slots)} skipped: {shown}; achieved {sent / duration if duration > 0 else 0:.1f} messages/s"
        )

    async def _close(self, forced: bool) -> int:
        accepted = None
        if self._health is not None:
            await self._health.cleanup()
        if self.stream_monitor is not None:
            self._stream_refresh.cancel()
            await asyncio.gather(self._stream_refresh, return_exceptions=True)
            await self.stream_monitor.close()
        if self.broker is not None:
            stats = self.broker.topic_stats(self._worker_cfg.topic)
            accepted = stats["messages"] if stats else 0
            await self.broker.close()
        published = sum(s.published for s in self.slots)
        unacked = sum(s.unacked for s in self.slots)
        per_worker = ", ".join(f"worker {s.index}={s.published}" for s in self.slots)
        summary = f"Drained: published={published} ({per_worker}) unacknowledged={unacked}"
        if accepted is not None:
            summary += f" broker_accepted={accepted}"
        lost = sum(s.lost_by_broker for s in self.slots)
        if lost:  # acknowledged, then lost by the broker (its log cut back); see broker.client.Publisher
            summary += f" broker_lost={lost}"
        unconfirmed = sum(s.unconfirmed for s in self.slots)
        if unconfirmed:  # held by a worker that crashed: they may or may not have been stored
            summary += f" unconfirmed={unconfirmed}"
        if forced:
            summary = "Forced exit: " + summary.removeprefix("Drained: ")
        if self.completed:
            log.info("%s", self._completion_summary())
        if unacked:
            log.error("%d messages were not acknowledged", unacked)
        log.info("%s", summary)
        broker_failed = self.broker is not None and self.broker.failure is not None
        if broker_failed:
            log.error("The embedded broker failed (%s): exiting non-zero", self.broker.failure)
        return 1 if forced or unacked or broker_failed or any(s.given_up or s.failed for s in self.slots) else 0


class _InheritedFd:
    """A file descriptor of this process handed to a spawned child (which gets its own copy):
    multiprocessing gives children /dev/null as standard input, so the CSV's `-` travels this way."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup) -> int:
    return dup.detach()


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a fork server that has imported the worker's modules once: a new worker
    is a fork of it (milliseconds, and the imported code's pages are shared), not a fresh
    interpreter importing everything again. The fork server is a fork of this process taken now,
    while it has no thread, socket or event loop (streamer.forkserver); the running supervisor is
    never forked. Where there is no fork server (not POSIX), workers are spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(forkserver.PRELOAD)
    _without_resource_tracker()
    forkserver.start()
    return context


@contextlib.contextmanager
def _main_script_not_rerun():
    """multiprocessing runs the parent's main script again in every child it starts when that
    script is a file (the `telemetry-streamer` console script, or a program embedding the
    streamer) and the child does not have it already, so that the child can find what the script
    defines. A fork server forked from this process has it; one that multiprocessing starts as a
    new interpreter (streamer.forkserver's fallback) does not, and there running the script again
    imported the whole command line (click, every option module) into every worker: 1.8 MB of its
    own per worker, which `python -m streamer` never paid (`--workers=5 --rate=10 --persistence`,
    before the fork server was forked: 115 MB PSS against 105). A worker needs nothing from the
    script (its target and arguments live in this package), so while one is started the main
    module is presented as a package's `__main__`, which multiprocessing does not run again
    (spawn._fixup_main_from_name). A process-wide change for that moment: a program embedding the
    streamer that starts processes of its own from another thread at the same moment would see it."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:  # python -m: already so
        yield
        return
    main.__spec__ = ModuleSpec("streamer.__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None


def _without_resource_tracker() -> None:
    """The fork server start method also starts multiprocessing's resource tracker: one more
    Python interpreter (8.4 MB PSS, as much as a worker) that unlinks the named semaphores and
    shared memory segments a dead process leaves behind. The workers create neither (a pipe each,
    and a RawArray, which lives in a file unlinked at once), so the tracker is not started: its
    channel, which the fork server hands on to each worker, is /dev/null instead. Were the
    streamer ever to use multiprocessing's locks, queues or SharedMemory, it would want the
    tracker back. (A tracker already running, or a Python without this attribute, is left alone.)"""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if tracker is not None and getattr(tracker, "_fd", 0) is None and getattr(tracker, "_pid", 0) is None:
        tracker._fd = os.open(os.devnull, os.O_WRONLY)


def _signal(process, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass
