"""Rows from an input read once (standard input, a FIFO), read by a thread so that the worker's
event loop never blocks on it.

A live pipe (`nvidia-smi --format=csv -l 1 | telemetry-streamer --csv=-`) delivers a row now and
then: reading it in the event loop would hold back acknowledgments and signals until the next
row, and a batch of 4,000 would wait for 4,000 rows. Here a thread reads rows into a queue and the
worker takes what is there (at least one row, at most a batch). The queue is bounded: the thread
waits while it is full.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .csvsource import CsvSource

MAX_QUEUED = 100_000


class PipeFeed:
    def __init__(self, source: CsvSource, loop: asyncio.AbstractEventLoop):
        self.source = source
        self.error: Exception | None = None
        self._loop = loop
        self._rows: deque[bytes] = deque()
        self._done = False
        self._signalled = False  # a wake-up is on its way to the loop
        self._ready = asyncio.Event()
        self._room = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="csv-pipe", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._closed:
                batch = self.source.take(1)  # one row at a time: it is published as soon as it arrives
                if not batch:
                    break
                with self._room:
                    while len(self._rows) >= MAX_QUEUED and not self._closed:
                        self._room.wait()
                self._rows.extend(batch)
                self._wake()
        except Exception as exc:  # OSError, CsvError: the worker reports it
            self.error = exc
        finally:
            self._done = True
            self._wake(force=True)

    def _wake(self, force: bool = False) -> None:
        if force or not self._signalled:
            self._signalled = True
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    @property
    def finished(self) -> bool:
        return self._done and not self._rows

    async def take(self, n: int) -> list[bytes]:
        """At least one row (waiting for it), at most n; [] once the input has ended."""
        while True:
            self._signalled = False
            self._ready.clear()
            if self._rows or self._done:
                break
            await self._ready.wait()
        rows = self._rows
        batch = [rows.popleft() for _ in range(min(n, len(rows)))]
        with self._room:
            self._room.notify()
        return batch

    def close(self) -> None:
        self._closed = True
        with self._room:
            self._room.notify()
