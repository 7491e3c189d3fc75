"""Imported by the workers' fork server when it starts (the supervisor's preload list), nowhere else.

A stop signal sent to the whole process group (`timeout`, systemd's default KillMode, `kill -TERM
-PGID`) reaches the fork server too. Were it to die, its children (the workers) would be killed
with it (they die with their parent, see worker.die_with_parent) before they had drained. So the
fork server blocks SIGTERM (it still exits when the streamer does: multiprocessing closes its
lifeline; SIGINT it already ignores).

Blocked, not ignored: a worker is forked with the fork server's signal mask, so a SIGTERM that
reaches a new worker before it has set up its handler stays pending instead of being lost (the
supervisor may begin a drain a moment after starting a worker), and is delivered the moment the
worker unblocks it (worker.Worker.run).

The fork server also runs without the cyclic garbage collector, as Python's gc documentation
advises for fork without exec: no collection leaves freed holes in the pages its imports fill,
and each worker, first thing, freezes what it inherited and turns the collector back on
(worker.main), so its collections never write to those pages and they stay shared (the tree of
`--workers=5 --rate=10 --persistence` measured 104 -> 99 MB PSS).
"""

from __future__ import annotations

import gc
import signal
import sys


def _in_the_fork_server() -> bool:
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_the_fork_server():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    gc.disable()
