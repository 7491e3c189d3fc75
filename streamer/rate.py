"""A worker's rate limit: a token bucket (aiolimiter) released in chunks.

At `rate` messages per second, messages are released `chunk` at a time (about 10 ms worth, at
least one, at most a batch), so the limiter is consulted per batch, not per message. The
bucket holds `capacity` tokens (at least a chunk, about 200 ms worth): a worker that falls
briefly behind (a slow send, a pause) catches up instead of losing those tokens, so the
long-run rate is exact. The bucket starts nearly full, so the first chunk goes at once and
there is no start-up burst beyond it.
"""

from __future__ import annotations

from aiolimiter import AsyncLimiter

CHUNK_S = 0.01
CATCH_UP_S = 0.2


class RateLimit:
    def __init__(self, rate: float, max_chunk: int):
        if rate <= 0:
            raise ValueError("rate must be positive (0 means unthrottled: use no RateLimit)")
        self.rate = rate
        self.chunk = max(1, min(max_chunk, int(rate * CHUNK_S)))
        self.capacity = max(float(self.chunk), rate * CATCH_UP_S)
        self._bucket = AsyncLimiter(self.capacity, self.capacity / rate)
        self._primed = False

    async def acquire(self, n: int) -> None:
        """Wait until `n` (at most `chunk`) messages may go."""
        if not self._primed:
            self._primed = True
            await self._bucket.acquire(self.capacity - self.chunk)
        await self._bucket.acquire(n)
