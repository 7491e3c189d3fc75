"""Rate accuracy in virtual time: deterministic, independent of how busy the machine is."""

import asyncio
import random

import pytest
from helpers import run_virtual

from streamer.rate import RateLimit


async def release_times(rate: float, duration: float, jitter: float = 0.0, seed: int = 1):
    """When each message was released over `duration` virtual seconds."""
    rng = random.Random(seed)
    limit = RateLimit(rate, max_chunk=1000)
    loop = asyncio.get_running_loop()
    times = []
    while loop.time() < duration:
        await limit.acquire(limit.chunk)
        times.extend([loop.time()] * limit.chunk)
        if jitter and rng.random() < 0.05:  # now and then late (a slow send, a GC pause): must catch up
            await asyncio.sleep(rng.uniform(0, jitter))
    return [t for t in times if t < duration]


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0, 5.0, 10.0, 1000.0, 50_000.0, 100_000.0])
def test_steady_rate_within_one_percent(rate):
    duration = max(20.0, 20 / rate)
    times = run_virtual(release_times(rate, duration + 12))
    window = [t for t in times if 2.0 <= t < 12.0 + max(0.0, 10 / rate - 10)]
    seconds = 10.0 + max(0.0, 10 / rate - 10)
    achieved = len(window) / seconds
    assert abs(achieved - rate) <= max(0.01 * rate, 1 / seconds), (rate, achieved)


@pytest.mark.parametrize("rate", [0.5, 5.0, 1000.0, 50_000.0])
def test_rate_holds_when_the_worker_is_sometimes_late(rate):
    times = run_virtual(release_times(rate, 32.0, jitter=0.1))
    achieved = len([t for t in times if 2.0 <= t < 32.0]) / 30.0
    assert abs(achieved - rate) <= max(0.01 * rate, 1 / 30.0), (rate, achieved)


@pytest.mark.parametrize("rate", [0.5, 10.0, 1000.0, 100_000.0])
def test_no_start_burst_beyond_one_seconds_worth(rate):
    times = run_virtual(release_times(rate, 3.0))
    first_second = len([t for t in times if t < 1.0])
    assert first_second <= max(1, rate)
    first_chunk_end = len([t for t in times if t == 0.0])
    assert first_chunk_end <= max(1, rate * 0.01)


def test_half_a_message_per_second_is_one_every_two_seconds():
    times = run_virtual(release_times(0.5, 20.0))
    assert times == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0])


@pytest.mark.parametrize("rate, chunk", [(10.0, 10), (50.0, 50), (1.0, 1), (2.0, 2), (99.0, 99), (100.0, 1)])
def test_low_rates_wake_once_per_linger(rate, chunk):
    """Below 100 messages/s a worker is released a chunk per --linger (1 s), not a message at a
    time; from 100/s up, chunks stay 10 ms worth."""
    assert RateLimit(rate, max_chunk=1000).chunk == chunk
    times = run_virtual(release_times(rate, 10.0))
    if chunk > 1:
        releases = sorted(set(times))
        assert len(releases) <= 10.0 / 1.0 + 1
        assert releases[0] == pytest.approx((chunk - 1) / rate)  # the first chunk goes when its last message is due
    assert abs(len(times) - rate * 10.0) <= chunk


def test_lingering_chunks_are_stamped_at_their_due_times():
    limit = RateLimit(10.0, max_chunk=1000)
    first, step = limit.due_times(5, now=10_000_000_000)
    assert (first, step) == (9_600_000_000, 100_000_000)  # the last one is due now, one step apart
    first, _ = limit.due_times(5, now=10_500_000_000)
    assert first == 10_100_000_000  # continues right after the previous chunk
    first, _ = limit.due_times(5, now=11_003_000_000)  # released 3 ms late: keeps its place in the schedule
    assert first == 10_600_000_000
    first, _ = limit.due_times(5, now=20_000_000_000)  # after a stall: the schedule starts again
    assert first == 19_600_000_000
    assert not RateLimit(10.0, max_chunk=1000, linger=0).lingering
