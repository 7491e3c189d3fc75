"""A worker's rate limit: a token bucket (aiolimiter) released in chunks.

At `rate` messages per second, messages are released `chunk` at a time, so the limiter is
consulted per batch, not per message:

- from 100 messages/s up, a chunk is about 10 ms worth (at most a batch);
- below that, a 10 ms chunk would be under one message, and a worker would wake up (and send,
  and be acknowledged) once per message. There a chunk is what falls due within `linger`
  (--linger, default 1 s): the worker wakes once per chunk, and stamps each message with the
  moment it fell due (`due_times`), so timestamps stay evenly spaced at exactly the rate while a
  message waits at most `linger`. linger=0 releases each message as it falls due.

The bucket holds `capacity` tokens (at least a chunk, about 200 ms worth): a worker that falls
briefly behind (a slow send, a pause) catches up instead of losing those tokens, so the
long-run rate is exact. The bucket starts nearly full, so the first chunk goes at once and
there is no start-up burst beyond it; a lingering bucket starts with one message's token, and
a worker's first chunk there is that one message (`first_chunk`), sent at once: a slow stream
shows that it works at start, not a linger later. Whole chunks follow.
"""

from __future__ import annotations

import time

from aiolimiter import AsyncLimiter

CHUNK_S = 0.01
CATCH_UP_S = 0.2
LINGER_S = 1.0


class RateLimit:
    def __init__(self, rate: float, max_chunk: int, linger: float = LINGER_S):
        if rate <= 0:
            raise ValueError("rate must be positive (0 means unthrottled: use no RateLimit)")
        self.rate = rate
        self.chunk = max(1, min(max_chunk, int(rate * CHUNK_S)))
        # below 1/CHUNK_S messages/s: one wake-up per `linger`, messages stamped with their due times
        self.lingering = rate * CHUNK_S < 1 and int(rate * linger) > 1
        if self.lingering:
            self.chunk = min(max_chunk, int(rate * linger))
        self.first_chunk = 1 if self.lingering else self.chunk
        self.capacity = max(float(self.chunk), rate * CATCH_UP_S)
        self._bucket = AsyncLimiter(self.capacity, self.capacity / rate)
        self._primed = False
        self._step_ns = round(1e9 / rate)
        self._last_due_ns = -(1 << 62)
        self._stall_ns = round(self.capacity / rate * 1e9)  # later than the bucket can catch up: a stall

    async def acquire(self, n: int) -> None:
        """Wait until `n` (at most `chunk`) messages may go."""
        if not self._primed:
            self._primed = True
            await self._bucket.acquire(self.capacity - (1 if self.lingering else self.chunk))
        await self._bucket.acquire(n)

    def due_times(self, n: int, now: int | None = None) -> tuple[int, int]:
        """For `n` messages just acquired: (first due time in ns since the epoch, step in ns).
        They continue the schedule one step after the previous chunk's last (a chunk released a
        little late keeps its place); after a stall longer than the bucket holds, the schedule
        starts again with the last one due now."""
        if now is None:
            now = time.time_ns()
        step = self._step_ns
        first = self._last_due_ns + step
        if now - (n - 1) * step - first > self._stall_ns or first > now:
            first = now - (n - 1) * step
        self._last_due_ns = first + (n - 1) * step
        return first, step
