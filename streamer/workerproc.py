"""What the supervisor needs of a worker process, without importing the worker itself: the names
of the counts a worker shares with it, and the entry point.

The worker's modules (CSV reading, replay, destinations) are imported by the workers' fork
server, once, and shared by every worker; the streamer's own process never runs them, and
importing them there cost it about 2 MB of memory of its own (`python3 tests/bench/efficiency.py`).
"""

from __future__ import annotations

# a worker's live counts, in memory it shares with the supervisor (a RawArray of these, in order)
COUNTERS = ("sent", "published", "unacked", "lost_by_broker", "read", "passes", "rows_per_pass")


def main(*args) -> None:
    """A worker process's entry point (multiprocessing's target): streamer.worker.main."""
    from streamer.worker import main as run_worker

    run_worker(*args)
