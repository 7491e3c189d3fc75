"""The broker's figures: the per-topic message rate over a sliding window, and the documents that
/stats and /stats/<topic> answer with (the counters themselves live where they are counted)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

RATE_WINDOW_S = 10.0
SAMPLE_EVERY_S = 1.0


class RateWindow:
    """Messages per second over about the last RATE_WINDOW_S, from counts sampled about once a second."""

    def __init__(self, now: float):
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])

    def sample(self, now: float, count: int) -> None:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()

    def rate(self, now: float, count: int) -> float:
        then, counted = self._samples[0]
        return (count - counted) / (now - then) if now > then else 0.0


class BrokerStats:
    def __init__(self, topics: dict, transport, dispatcher):
        self.topics = topics
        self.transport = transport
        self.dispatcher = dispatcher
        self.started = time.monotonic()
        # (topic, callable): the embedded streamer's workers, shown in /stats and /stats/<topic>
        self.workers: tuple[str, object] | None = None

    async def sample_rates(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            now = time.monotonic()
            for topic in list(self.topics.values()):
                topic.sample_rate(now)

    def topic_stats(self, name: str) -> dict | None:
        topic = self.topics.get(name)
        if topic is None:
            return None
        stats = topic.stats(self.started)
        if self.workers is not None and self.workers[0] == name:
            stats["workers"] = self.workers[1]()
        return stats

    def stats(self) -> dict:
        return {
            "topics": {name: topic.stats(self.started) for name, topic in self.topics.items()},
            "bad_frames": dict(self.dispatcher.bad_frames),
            "connections": self.transport.connection_stats(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            **({"workers": self.workers[1]()} if self.workers is not None else {}),
        }

    def healthy(self) -> bool:
        """Serving, and every log takes writes."""
        return all(t.log is None or t.log.error is None for t in self.topics.values())
