"""Replay as people use it: the layer between the CSV source and the message envelope.

`Replay` takes the encoded rows `CsvSource` reads, pass after pass, and decides per row:

    shard      is it this worker's? (row by row: row i goes to worker i mod N; with keys: by a
               CRC-32 of the key, so a key always goes to the same worker and keeps its order)
    filter     does it match every --filter? (else skipped as `filtered`)
    time       its own time from --timestamp-column (else skipped as `bad_timestamp`)
    counters   --counter-column values raised by pass x (their increase over one pass, per key)

and yields `(fields bytes, message time ns, due seconds, key)`: the message time for
--timestamps=original|shifted, when the row is due (seconds after the run's anchor) for
--pace=timestamps, and the message key (JSON string bytes, b"" without --key-columns), which
the envelope carries as `"key"` (streamer.message).

Before the first pass the file is read once (`scan`) for what the passes need to know in advance:
the first time, the span, one typical interval (the median gap between distinct times), the gaps
longer than --max-gap, each key's counter increase, and how many rows are this worker's.

Pass p (from 0) of a recording whose first time is T0 and span S, with typical interval I:

    shifted message time   anchor + p * (S + I) + (t - T0)                  (never goes back)
    due (pace=timestamps)  (p * (S' + I') + (t - T0 - cut(t))) / speed      (S', I', cut: gaps over
                                                                            --max-gap shortened)

Without any of these options the worker does not use this layer: its hot path is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import zlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import orjson

from .config import ReplayConfig
from .csvsource import SKIP_REASONS, CsvSource, compact
from .infer import infer
from .profile import Profile
from .timestamps import NS, parse_time_ns

log = logging.getLogger("streamer.replay")

REPLAY_SKIP_REASONS = ("filtered", "bad_timestamp")  # counted here, by the row's own worker
CSV_SKIP_REASONS = tuple(r for r in SKIP_REASONS if r not in REPLAY_SKIP_REASONS)  # counted by the CSV reader

KEY_SEPARATOR = "/"
KEY_FIELD_BYTES = len(b',"key":')


def _matcher(values: tuple[str, ...]) -> frozenset:
    """A filter's accepted values, both as written and as typed (so `gpu_id=0` matches the int 0)."""
    accepted = set()
    for v in values:
        accepted.add(v)
        typed = infer(v)
        if not isinstance(typed, float) or typed == typed:
            accepted.add(typed)
    return frozenset(accepted)


def key_of(fields: dict, columns: tuple[str, ...]) -> str:
    """The message key: the key columns' values joined by `/` (booleans as true/false, null as empty)."""
    parts = []
    for c in columns:
        v = fields.get(c)
        parts.append("" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v))
    return KEY_SEPARATOR.join(parts)


def worker_of_key(key: str, workers: int) -> int:
    return zlib.crc32(key.encode()) % workers


@dataclass
class Recording:
    """What one whole pass says, found by `Replay.scan` before the first pass."""

    rows: int = 0  # usable rows in the file
    mine: int = 0  # rows this worker sends per pass (after shard and filters)
    first_ns: int = 0
    span_ns: int = 0  # last time - first time
    interval_ns: int = NS  # the typical gap between distinct times
    cuts: list = field(default_factory=lambda: [-(1 << 63)])  # times at which a gap over max_gap ends
    cut_ns: list = field(default_factory=lambda: [0])  # how much is cut up to and including that gap
    increases: dict = field(default_factory=dict)  # (key, column) -> increase over one pass
    long_gaps: int = 0

    @property
    def period_ns(self) -> int:
        """How far each pass's shifted times lie after the previous pass's."""
        return self.span_ns + self.interval_ns

    def offset_ns(self, t: int) -> int:
        """t relative to the first time, with the long gaps shortened."""
        return t - self.first_ns - self.cut_ns[bisect_right(self.cuts, t) - 1]

    def pace_period_ns(self, max_gap_ns: int) -> int:
        return self.offset_ns(self.first_ns + self.span_ns) + min(self.interval_ns, max_gap_ns)


class Replay:
    """This worker's rows of each pass, chosen, transformed and timed (see the module docstring)."""

    def __init__(self, source: CsvSource, cfg: ReplayConfig, index: int, label: str = "", start_pass: int = 0):
        self.source = source
        self.cfg = cfg
        self.index = index
        self.label = label or f"Worker {index}"
        self.passes_done = start_pass
        self.read = 0  # rows of this worker's share read (sent, filtered or unusable)
        self.recording: Recording | None = None
        self._filters = [(column, _matcher(values)) for column, values in cfg.filters]
        workers = cfg.workers if cfg.shard else 1
        self._shard_rows = workers > 1 and not cfg.key_columns
        self._shard_keys = workers > 1 and bool(cfg.key_columns)
        self._workers = workers
        self._max_gap_ns = round(cfg.max_gap * NS)

    # -- what this worker sends of one row -----------------------------------------------------------

    def _matches(self, fields: dict) -> bool:
        for column, accepted in self._filters:
            value = fields.get(column)
            if value not in accepted and str(value) not in accepted:
                return False
        return True

    # -- the scan before the first pass --------------------------------------------------------------

    def scan(self) -> Recording:
        """Read the file once for what the passes need in advance (see the module docstring). Rows
        skipped in it are not counted (the passes count them). Raises OSError or CsvError."""
        cfg, rec = self.cfg, Recording()
        skipped_before = self.source.skipped.copy()
        column = cfg.timestamp_column
        times_seen: list[int] = []
        first_values: dict = {}
        last_values: dict = {}
        previous = None
        try:
            for i, raw in enumerate(self.source.open_pass()):
                rec.rows += 1
                if not cfg.decodes_rows:
                    rec.mine += not self._shard_rows or i % self._workers == self.index
                    continue
                fields = orjson.loads(raw)
                key = key_of(fields, cfg.key_columns) if cfg.key_columns else ""
                if self._mine(i, key) and self._matches(fields):
                    rec.mine += 1
                if column:
                    t = parse_time_ns(fields.get(column))
                    if t is None:
                        continue
                    if previous is None:
                        rec.first_ns = t
                    elif t != previous:
                        gap = t - previous
                        if gap > 0:
                            times_seen.append(gap)
                        if gap > self._max_gap_ns:
                            rec.long_gaps += 1
                            rec.cuts.append(t)
                            rec.cut_ns.append(rec.cut_ns[-1] + gap - self._max_gap_ns)
                    rec.span_ns = max(rec.span_ns, t - rec.first_ns)
                    previous = t
                for c in cfg.counter_columns:
                    v = fields.get(c)
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        first_values.setdefault((key, c), v)
                        last_values[(key, c)] = v
        finally:
            self.source.skipped.clear()
            self.source.skipped.update(skipped_before)
        if times_seen:
            rec.interval_ns = round(statistics.median(times_seen))
        rec.increases = {k: last_values[k] - v for k, v in first_values.items() if last_values[k] > v}
        if rec.long_gaps and self.index == 0:
            log.warning(
                "%s: %d gaps in %s are longer than --max-gap (%g s); paced replay shortens them to it", self.label, rec.long_gaps, self.source.path, cfg.max_gap
            )
        self.recording = rec
        return rec

    def _mine(self, i: int, key: str) -> bool:
        if self._shard_rows:
            return i % self._workers == self.index
        if self._shard_keys:
            return worker_of_key(key, self._workers) == self.index
        return True

    # -- the passes ------------------------------------------------------------------------------------

    def items(self, anchor_ns: int = 0) -> Iterator[tuple[bytes, int, float, bytes]]:
        """(fields, message time ns, due s after the anchor, key) of this worker's rows, pass after pass
        from `passes_done`, until --passes are done (forever with 0). Raises OSError or CsvError
        when the file cannot be read; calling again restarts the current pass."""
        rec = self.recording if self.recording is not None else self.scan()
        cfg = self.cfg
        # sharded, every worker reads every row: rows the CSV reader skips are counted by worker 0
        # only, so the summary's totals count each once (filtered and bad_timestamp are counted
        # by the row's own worker)
        recount = self._workers > 1 and self.index != 0
        while not cfg.passes or self.passes_done < cfg.passes:
            before = self.source.skipped.copy() if recount else None
            yield from self._pass(self.passes_done, rec, anchor_ns)
            if recount:
                for reason in CSV_SKIP_REASONS:
                    self.source.skipped[reason] = before[reason]
                self.source.skipped += Counter()  # drop zero counts
            self.passes_done += 1

    def _pass(self, p: int, rec: Recording, anchor_ns: int) -> Iterator[tuple[bytes, int, float, bytes]]:
        cfg, source = self.cfg, self.source
        skipped = source.skipped
        workers, index = self._workers, self.index
        shard_rows, decode = self._shard_rows, cfg.decodes_rows
        column, counters, keyed = cfg.timestamp_column, cfg.counter_columns, cfg.key_columns
        shifted = cfg.timestamps == "shifted"
        shift_ns = anchor_ns + p * rec.period_ns - rec.first_ns
        pace_base_ns = p * rec.pace_period_ns(self._max_gap_ns)
        speed = cfg.speed
        raise_by = {k: v * p for k, v in rec.increases.items()} if p else {}
        room = source.max_fields_bytes  # the envelope's key must fit the message cap too
        key_json = b""
        for i, raw in enumerate(source.open_pass()):
            if shard_rows and i % workers != index:
                continue
            if not decode:
                self.read += 1
                yield raw, 0, 0.0, b""
                continue
            fields = orjson.loads(raw)
            key = key_of(fields, keyed) if keyed else ""
            if self._shard_keys and worker_of_key(key, workers) != index:
                continue
            self.read += 1
            if keyed:
                key_json = compact(orjson.dumps(key))
                if room is not None and len(raw) + len(key_json) + KEY_FIELD_BYTES > room:
                    skipped["message_too_large"] += 1
                    continue
            if self._filters and not self._matches(fields):
                skipped["filtered"] += 1
                continue
            stamp, due = 0, 0.0
            if column:
                t = parse_time_ns(fields.get(column))
                if t is None:
                    skipped["bad_timestamp"] += 1
                    continue
                stamp = t + shift_ns if shifted else t
                due = (pace_base_ns + rec.offset_ns(t)) / NS / speed
            if raise_by:
                changed = False
                for c in counters:
                    inc = raise_by.get((key, c))
                    if inc:
                        fields[c] += inc
                        changed = True
                if changed:
                    raw = compact(orjson.dumps(fields))
            yield raw, stamp, due, key_json


# -- when rows go: the three gates a replaying worker can use --------------------------------------------
#
# Each takes rows from `items` and awaits `send(batch, stamps)` (stamps: the message times, or None
# for processing time); each returns when `items` ends. They read the running loop's clock only,
# so tests drive them in virtual time (tests/test_replay.py).


async def run_rate(items: Iterator, send, limit, max_batch: int) -> None:
    """--pace=rate: `limit` (a streamer.rate.RateLimit, or None = unthrottled) releases chunks."""
    full = limit.chunk if limit is not None else max_batch
    chunk = limit.first_chunk if limit is not None else full  # a slow stream's first message goes at once
    lingering = limit is not None and limit.lingering
    while True:
        if limit is not None:
            await limit.acquire(chunk)
        batch = list(islice(items, chunk))
        chunk = full
        if not batch:
            return
        stamps = None
        if lingering:
            first, step = limit.due_times(len(batch))
            stamps = [first + i * step for i in range(len(batch))]
        await send(batch, stamps)


async def run_paced(items: Iterator, send, base: float, max_batch: int) -> None:
    """--pace=timestamps: each row goes when the loop's clock reaches base + its due seconds; rows
    due by then (a same-time group) go together, up to max_batch per send."""
    loop = asyncio.get_running_loop()
    pending = next(items, None)
    while pending is not None:
        delay = base + pending[2] - loop.time()
        while delay > 0:  # uvloop's timers round to the millisecond and may fire a little early
            await asyncio.sleep(delay)
            delay = base + pending[2] - loop.time()
        now = loop.time() - base
        batch = [pending]
        pending = None
        for item in items:
            if item[2] > now or len(batch) >= max_batch:
                pending = item
                break
            batch.append(item)
        await send(batch, None)


@dataclass
class ProfileRun:
    """A profile's progress in one worker: when it started (loop time) and how many were sent."""

    profile: Profile
    share: float  # this worker's part of the total rate (1 / workers)
    start: float | None = None
    sent: int = 0
    done: bool = False

    def state(self, now: float) -> dict:
        state = self.profile.state(now - self.start if self.start is not None else 0.0)
        state["target_rate"] = round(state["target_rate"] * self.share, 3)  # this worker's
        return state


PROFILE_TICK_S = 0.01  # the shortest wait between checks
PROFILE_IDLE_S = 0.1  # the longest (a rate rising from 0 is noticed within it)


async def run_profile(items: Iterator, send, run: ProfileRun, max_batch: int) -> None:
    """--profile / --total-rate: send what the profile's integral says is due by now (this worker's
    share), checking every PROFILE_TICK_S; returns when the profile ends (or items do)."""
    loop = asyncio.get_running_loop()
    if run.start is None:
        run.start = loop.time()
    profile = run.profile
    while True:
        elapsed = loop.time() - run.start
        finished = profile.finished(elapsed)
        due = int((profile.total_count() if finished else profile.count(elapsed)) * run.share + 1e-9) - run.sent
        while due > 0:
            batch = list(islice(items, min(due, max_batch)))
            if not batch:
                return
            await send(batch, None)
            run.sent += len(batch)
            due -= len(batch)
        if finished:
            run.done = True
            return
        # the next message is due in about (1 - the fraction already due) / the current rate: at
        # low rates a worker wakes when it is, not every tick (at most PROFILE_IDLE_S apart)
        rate = profile.rate_at(elapsed) * run.share
        owed = run.sent + 1 - profile.count(elapsed) * run.share
        await asyncio.sleep(min(PROFILE_IDLE_S, max(PROFILE_TICK_S, owed / rate if rate > 0 else PROFILE_IDLE_S)))
