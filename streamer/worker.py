"""One worker process: read the CSV pass after pass, wrap rows as messages, publish them under
the worker's own rate limit, and drain on SIGTERM.

The per-message path is `Envelope.batch` (one clock read and one format per message); everything
else here happens per batch or per pass.

The parent reads the worker's counts (COUNTERS) from memory they share, written where they change
(after a send, when acknowledgments arrive): always current, and no message or wake-up for them.
The rest goes over a pipe as a status dict, {"skipped", "failed", "finished"} (and "profile" with
--profile), when it changed: looked at about once a second while acknowledgments arrive (a moment
the worker is awake anyway), from a timer of its own otherwise (STATUS_FALLBACK_S, backing off to
STATUS_IDLE_S while nothing changes), and once more at exit (see supervisor.WorkerSlot).
`finished` (in the final status only) means the input was read once to its end (standard input,
a FIFO) or the replay is done, and the worker drained on its own: the parent does not restart it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection

import orjson

from broker.client import DEFAULT_WINDOW_BYTES
from broker.host import keep_freed_memory
from broker.protocol import batch_bytes
from common.logsetup import setup_logging

from .config import WorkerConfig
from .csvsource import CsvError, CsvSource, NoUsableRows
from .destinations import kind_of, open_destination
from .forkserver import set_name
from .message import Envelope
from .pipefeed import PipeFeed
from .rate import RateLimit
from .replay import ProfileRun, Replay, run_paced, run_profile, run_rate

log = logging.getLogger("streamer.worker")

PROGRESS_INTERVAL_S = 10.0  # "Worker i: Processed N records" at most this often
STATUS_INTERVAL_S = 1.0  # the status (skipped rows, ...) is looked at at most this often with an acknowledgment,
STATUS_FALLBACK_S = 2.0  # and from a timer when none brought a look for this long (a slow or idle worker, a broker away),
STATUS_IDLE_S = 10.0  # which backs off to this while nothing changes
# the live counts in the memory shared with the parent are streamer.workerproc.COUNTERS (int64s,
# in that order); `passes` is the replay's passes done in all (earlier processes of the slot
# included), the rest this process's
REPORT_INTERVAL_S = 10.0  # an unchanged report goes to the broker again this often (e.g. after its restart)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0  # backoff while the file is missing or unusable
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> int:
    """Make the kernel kill this process when its parent dies, even by SIGKILL (Linux); returns
    the parent's pid. The parent is the supervisor's fork server, which exits when the supervisor
    does (or the supervisor itself where workers are spawned)."""
    parent_pid = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    return parent_pid


def schedule_as_batch_work() -> bool:
    """Ask the kernel to treat this process as CPU-bound batch work (SCHED_BATCH, Linux), so its
    ZeroMQ I/O thread's wake-ups stop preempting busy threads (measurements: docs/DESIGN.md).
    Set before any thread starts (threads inherit it); needs no privilege. False where unsupported."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return False
    return True


def watch_supervisor(pid: int) -> int | None:
    """A descriptor that becomes readable when the streamer (the supervisor, `pid`) exits.

    A worker's parent is the fork server, and the fork server outlives the streamer for as long
    as any worker lives (multiprocessing hands its lifeline on to every child it forks), so after
    a SIGKILL of the streamer the parent-death signal would never fire: workers and fork server
    stayed behind for good. None where pidfds are unavailable (spawned workers' parent is the
    streamer itself: die_with_parent and the parent check cover them)."""
    if not pid or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except OSError:
        return None


def main(cfg: WorkerConfig, index: int, status: Connection, counters, stdin_fd: int | None = None, start_pass: int = 0, supervisor_pid: int = 0) -> None:
    """Entry point of a worker process (started by the supervisor); `counters` is the memory
    shared with it (COUNTERS); stdin_fd is the parent's standard input when the CSV is read from
    it (multiprocessing gives a child /dev/null)."""
    # What the fork server imported stays shared: its objects leave the collector's generations, so
    # a collection here never writes to (and so copies) their pages (see streamer.forkserver)
    gc.freeze()
    gc.enable()
    set_name(b"worker-%d" % index)  # not the fork server's name, which a fork inherits
    parent_pid = die_with_parent()
    supervisor = watch_supervisor(supervisor_pid)
    if cfg.replay.pace != "timestamps":  # a paced worker wants its timers on time, not batch scheduling
        schedule_as_batch_work()
    # a batch body is built, sent and held until acknowledged, then freed: with glibc's defaults
    # the next one faulted its pages in again (about 20,000 page faults a second per worker, two
    # workers unthrottled; docs/BENCHMARKS.md)
    keep_freed_memory(2 * DEFAULT_WINDOW_BYTES)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group; the parent decides
    setup_logging(cfg.log_level, cfg.log_format, component="worker", worker=index)
    try:
        import uvloop

        uvloop.run(Worker(cfg, index, status, counters, parent_pid, stdin_fd, start_pass, supervisor).run())
    except Exception:
        log.exception("Worker %d: crashed", index)
        sys.exit(1)


class Worker:
    def __init__(
        self,
        cfg: WorkerConfig,
        index: int,
        status: Connection,
        counters,
        parent_pid: int,
        stdin_fd: int | None = None,
        start_pass: int = 0,
        supervisor: int | None = None,
    ):
        self.cfg = cfg
        self.index = index
        self.label = f"Worker {index}"
        self.status = status
        self.counters = counters
        self.parent_pid = parent_pid
        self.supervisor = supervisor  # watch_supervisor's descriptor, or None
        self.sent = 0
        self.source = CsvSource(cfg.csv, cfg.column_types, fmt=cfg.csv_format, max_message_bytes=cfg.max_message_bytes, label=self.label, stdin_fd=stdin_fd)
        self.finished = False  # a read-once input is done: drain and exit without a restart
        self.failed = False
        # with replay options, rows go through streamer.replay; without, the plain loop (_produce)
        self.replay = Replay(self.source, cfg.replay, index, self.label, start_pass) if cfg.replay.active else None
        self.profile_run = ProfileRun(cfg.replay.profile, 1 / cfg.replay.workers) if cfg.replay.profile else None
        self.destination = open_destination(cfg)
        self.destination.label = self.label  # its log lines name the worker
        self.name = f"worker-{index}@{socket.gethostname()}/{os.getpid()}"
        self._stop = asyncio.Event()
        self._status_at = float("-inf")  # when the status was last looked at (monotonic): the first acknowledgment looks
        self._status_every = STATUS_FALLBACK_S
        self._status_timer: asyncio.TimerHandle | None = None
        self._last_status: dict | None = None
        self._reported: dict | None = None  # the skipped rows the broker last heard, and when
        self._reported_at = 0.0
        self._reporting: asyncio.Task | None = None

    async def run(self) -> None:
        """Start, produce until told to stop, then drain: flush what is sent, report, exit."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        if self.supervisor is not None:
            loop.add_reader(self.supervisor, self._supervisor_gone)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork (streamer.forkserver): one pending is delivered now
        await self.destination.start()
        self.destination.on_acknowledged = self._on_acknowledged
        self._count()
        log.info("%s started (pid %d, producer %s)", self.label, os.getpid(), self.destination.producer_id.hex())
        producing = asyncio.create_task(self._produce() if self.replay is None else self._produce_replay())
        stopping = asyncio.create_task(self._stop.wait())
        self._status_timer = loop.call_later(STATUS_FALLBACK_S, self._status_timer_fired)
        await asyncio.wait({producing, stopping}, return_when=asyncio.FIRST_COMPLETED)

        # drain: stop reading, wait for what is sent to be acknowledged, report, close (the
        # statuses along the way stop: the final one is the last)
        self.destination.on_acknowledged = None
        if self._status_timer is not None:
            self._status_timer.cancel()
        tasks = (producing, stopping, *([self._reporting] if self._reporting is not None else []))
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await self._report_to_broker()  # ahead of the flush, so it arrives before the last ACK
        flushed = await self.destination.flush(self.cfg.shutdown_timeout)
        if not flushed:
            log.warning("%s: shutdown timeout (%.1f s): %d messages unacknowledged", self.label, self.cfg.shutdown_timeout, self.destination.unacked)
        self._count()
        self._send_status(final=True)
        await self.destination.close()
        log.info("%s stopped: published=%d unacknowledged=%d", self.label, self.destination.published, self.destination.unacked)
        if isinstance(results[0], Exception) and not isinstance(results[0], asyncio.CancelledError):
            raise results[0]

    async def _produce(self) -> None:
        cfg, source, destination = self.cfg, self.source, self.destination
        limit = RateLimit(cfg.rate, cfg.batch_messages, cfg.linger) if cfg.rate > 0 else None
        lingering = limit is not None and limit.lingering
        base_chunk = limit.chunk if limit else cfg.batch_messages
        chunk = limit.first_chunk if limit else base_chunk  # a slow stream's first message goes alone
        # a batch body stays within the message cap (so the broker's size check never has to
        # split it) and well inside the frame cap; large rows shrink the batches that follow
        self._batch_bytes = batch_bytes(cfg.max_message_bytes)
        envelope = Envelope()
        retry = RETRY_MIN_S
        last_progress = last_pass_log = time.monotonic()
        logged_sent = logged_passes = 0
        warned_unusable = False
        shown = "standard input" if source.path == "-" else source.path
        feed = PipeFeed(source, asyncio.get_running_loop()) if source.one_shot else None
        while True:
            if feed is not None:  # read once, by a thread: a live pipe never blocks this loop
                try:
                    batch = await feed.take(chunk)
                except asyncio.CancelledError:
                    feed.close()
                    raise
                if not batch and feed.error is not None:
                    self._cannot_read_again(shown, feed.error)
                    return
            else:
                batch = None
            try:
                if batch is None:
                    batch = source.take(chunk)
            except NoUsableRows as exc:
                # every row of a pass was skipped: say so once (with the reasons), then back off quietly
                if not warned_unusable:
                    log.warning("%s: %s; retrying with backoff (up to %.0f s)", self.label, exc, RETRY_MAX_S)
                    warned_unusable = True
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            except (OSError, CsvError) as exc:
                if source.finished:
                    self._cannot_read_again(shown, exc)
                    return
                log.warning("%s: cannot read %s (%s); retrying in %.1f s", self.label, shown, _reason(exc), retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            if not batch and source.finished:
                log.info("%s: end of %s after %d records (it is read once); draining", self.label, shown, self.sent)
                self.finished = True
                return
            retry = RETRY_MIN_S
            warned_unusable = False
            if limit:
                await limit.acquire(len(batch))
            body = envelope.batch_at(batch, *limit.due_times(len(batch))) if lingering else envelope.batch(batch)
            if len(body) > self._batch_bytes and len(batch) > 1:
                chunk = max(1, len(batch) * self._batch_bytes * 9 // (len(body) * 10))
                await self._publish_split(batch, envelope)
            else:
                if chunk < base_chunk and lingering:  # after the first message alone: whole chunks
                    chunk = base_chunk
                elif chunk < base_chunk and len(body) * 2 < self._batch_bytes:  # rows got smaller again
                    chunk = min(base_chunk, chunk * 2)
                await destination.publish(body, len(batch))
            self.sent += len(batch)
            self._count()
            await asyncio.sleep(0)  # sends that complete at once never yield: let acks and signals in

            now = time.monotonic()
            if source.completed_passes > logged_passes and (logged_passes == 0 or now - last_pass_log >= PROGRESS_INTERVAL_S):
                log.info("%s: Reached end of CSV, restarting from beginning (pass %d)", self.label, source.completed_passes + 1)
                last_pass_log, logged_passes = now, source.completed_passes
            if now - last_progress >= PROGRESS_INTERVAL_S:
                log.info("%s: Processed %d records (%.1f/s)", self.label, self.sent, (self.sent - logged_sent) / (now - last_progress))
                last_progress, logged_sent = now, self.sent

    async def _publish_split(self, rows: list[bytes], envelope: Envelope, stamps: list[int] | None = None, keys: list[bytes] | None = None) -> None:
        half = len(rows) // 2
        for part, part_stamps, part_keys in (
            (rows[:half], stamps and stamps[:half], keys and keys[:half]),
            (rows[half:], stamps and stamps[half:], keys and keys[half:]),
        ):
            body = self._body(envelope, part, part_stamps, part_keys)
            if len(body) > self._batch_bytes and len(part) > 1:
                await self._publish_split(part, envelope, part_stamps, part_keys)
            elif part_keys is not None and kind_of(self.cfg.broker_url) == "nats":
                from .destinations.nats import key_subject

                topic = self.cfg.topic.encode()
                await self.destination.publish(body, len(part), [key_subject(topic, orjson.loads(k)) for k in part_keys])
            else:
                await self.destination.publish(body, len(part))

    @staticmethod
    def _body(envelope: Envelope, rows: list[bytes], stamps: list[int] | None, keys: list[bytes] | None) -> bytes:
        if keys is not None:
            return envelope.batch_keyed(rows, keys, stamps)
        return envelope.batch(rows) if stamps is None else envelope.batch_times(rows, stamps)

    def _cannot_read_again(self, shown: str, error: Exception) -> None:
        """A read-once input (standard input, a FIFO) failed: it cannot be retried, so this worker stops."""
        log.error("%s: cannot read %s (%s); it cannot be read again: stopping", self.label, shown, _reason(error))
        self.finished = self.failed = True

    async def _produce_replay(self) -> None:
        """Rows through streamer.replay: chosen (shard, filters), transformed (counters), timed
        (--pace, --profile, --rate) and stamped (--timestamps), for --passes passes or forever."""
        cfg, replay = self.cfg, self.replay
        r = cfg.replay
        loop = asyncio.get_running_loop()
        self._batch_bytes = batch_bytes(cfg.max_message_bytes)
        envelope = Envelope()
        own_times = r.timestamps != "now"
        keyed = bool(r.key_columns)
        subject_of = None  # with NATS, a keyed message goes to the subject <topic>.<key>
        if keyed and kind_of(cfg.broker_url) == "nats":
            from .destinations.nats import key_subject as subject_of
        topic = cfg.topic.encode()
        limit = RateLimit(cfg.rate, cfg.batch_messages, cfg.linger) if cfg.rate > 0 and r.pace == "rate" and self.profile_run is None else None
        base = None
        retry = RETRY_MIN_S

        async def send(batch: list, stamps: list[int] | None) -> None:
            rows = [item[0] for item in batch]
            if own_times:
                stamps = [item[1] for item in batch]
            keys = [item[3] for item in batch] if keyed else None
            body = self._body(envelope, rows, stamps, keys)
            if len(body) > self._batch_bytes and len(rows) > 1:
                await self._publish_split(rows, envelope, stamps, keys)
            elif subject_of is not None:
                await self.destination.publish(body, len(rows), [subject_of(topic, orjson.loads(k)) for k in keys])
            else:
                await self.destination.publish(body, len(rows))
            self.sent += len(rows)
            self._count()
            await asyncio.sleep(0)  # let acks and signals in

        while True:
            try:
                if replay.recording is None:
                    rec = await asyncio.to_thread(replay.scan)
                    log.info("%s: %d rows per pass are this worker's (of %d in the file)", self.label, rec.mine, rec.rows)
                    if rec.mine == 0:  # all filtered out, or sharded to other workers: nothing to send, ever
                        log.warning("%s: no rows to send (--filter / --shard leave none for it)", self.label)
                        if not r.passes:  # (with --passes they run, counting what they skip)
                            if self.profile_run is not None:
                                break
                            await asyncio.Event().wait()  # continuous: idle until the drain
                if base is None:
                    # the schedule starts at the anchor, a wall time shared by every worker; the
                    # loop's clock keeps it (no drift). A first start whose scan took longer
                    # starts its schedule now instead of rushing to catch up.
                    base = loop.time() + (cfg.anchor_ns - time.time_ns()) / 1e9
                    if base < loop.time() and replay.passes_done == 0 and r.pace == "timestamps":
                        log.info("%s: ready %.2f s after the common start: its schedule starts now", self.label, loop.time() - base)
                        base = loop.time()
                items = replay.items(cfg.anchor_ns)
                if r.pace == "timestamps":
                    await run_paced(items, send, base, cfg.batch_messages)
                elif self.profile_run is not None:
                    await run_profile(items, send, self.profile_run, cfg.batch_messages)
                else:
                    await run_rate(items, send, limit, cfg.batch_messages)
            except (OSError, CsvError) as exc:
                log.warning("%s: cannot read %s (%s); retrying the pass in %.1f s", self.label, self.source.path, _reason(exc), retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_S)
                continue
            break
        what = f"{replay.passes_done} pass{'' if replay.passes_done == 1 else 'es'}" if r.passes else "the profile"
        log.info("%s: done after %s (%d records); draining", self.label, what, self.sent)
        self.finished = True

    def _count(self) -> None:
        """The live counts, into the memory the parent reads (a few stores: no message, no wake-up)."""
        counters, destination = self.counters, self.destination
        counters[0] = self.sent
        counters[1] = destination.published
        counters[2] = destination.unacked
        counters[3] = destination.lost_by_broker
        if self.replay is not None:
            counters[4] = self.replay.read
            counters[5] = self.replay.passes_done
            counters[6] = self.replay.recording.mine if self.replay.recording is not None else 0

    def _on_acknowledged(self) -> None:
        self._count()
        now = time.monotonic()
        if now - self._status_at >= STATUS_INTERVAL_S:
            self._status(now)

    def _supervisor_gone(self) -> None:
        """The streamer died without stopping us (SIGKILL, OOM kill): nobody is left to count or
        restart this worker, nor (embedded) a broker to acknowledge it, so it exits at once, as
        the kernel's parent-death signal does for a worker whose parent dies."""
        log.warning("%s: the streamer is gone; exiting", self.label)
        os._exit(1)

    def _status(self, now: float) -> None:
        """The status to the parent if it changed, and the report to the broker when the skipped
        rows changed (or every REPORT_INTERVAL_S: no wake-up of the broker for nothing new).
        Called when the worker is awake anyway (acknowledgments arrived), or by the fallback
        timer, which it re-arms: a worker acknowledged at least once a second never wakes for it."""
        if os.getppid() != self.parent_pid:  # orphaned where PDEATHSIG is unavailable
            self._stop.set()
        self._count()  # (a refused batch leaves unacknowledged without an acknowledgment)
        skipped = dict(self.source.skipped)  # the report goes a moment later: it says what the status says
        if (self._reporting is None or self._reporting.done()) and (skipped != self._reported or now - self._reported_at >= REPORT_INTERVAL_S):
            self._reported, self._reported_at = skipped, now
            self._reporting = asyncio.ensure_future(self._report_to_broker(skipped))
        status = self._status_now()
        unchanged = status == self._last_status
        if not unchanged:
            self._send(status)
        self._status_every = min(self._status_every * 2, STATUS_IDLE_S) if unchanged else STATUS_FALLBACK_S
        self._status_at, self._last_status = now, status
        if self._status_timer is not None:
            self._status_timer.cancel()
        self._status_timer = asyncio.get_running_loop().call_later(self._status_every, self._status_timer_fired)

    def _status_timer_fired(self) -> None:
        self._status_timer = None
        self._status(time.monotonic())

    async def _report_to_broker(self, skipped: dict | None = None) -> None:
        """The worker's name and skipped rows (by default, as they are now) go to the broker's stats (`producers`, `skipped`)."""
        try:
            await self.destination.report({"name": self.name, "skipped": dict(self.source.skipped) if skipped is None else skipped})
        except Exception:  # the report is informative; never let it stop a drain
            log.debug("%s: report to broker failed", self.label, exc_info=True)

    def _status_now(self, final: bool = False) -> dict:
        status = {"skipped": dict(self.source.skipped), "finished": self.finished and final, "failed": self.failed}
        if self.profile_run is not None:
            status["profile"] = self.profile_run.state(asyncio.get_running_loop().time())
        return status

    def _send_status(self, final: bool = False) -> None:
        self._send(self._status_now(final))

    def _send(self, status: dict) -> None:
        try:
            self.status.send_bytes(orjson.dumps(status))
        except OSError:  # parent gone
            self._stop.set()


def _reason(error: Exception) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
