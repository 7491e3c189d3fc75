"""Imported by the workers' fork server when it starts (the supervisor's preload list), nowhere else.

A stop signal sent to the whole process group (`timeout`, systemd's default KillMode, `kill -TERM
-PGID`) reaches the fork server too. Were it to die, its children (the workers) would be killed
with it (they die with their parent, see worker.die_with_parent) before they had drained. So the
fork server ignores SIGTERM; it still exits when the streamer does (multiprocessing closes its
lifeline), and SIGINT it already ignores. Each worker sets its own SIGTERM handling at start.
"""

from __future__ import annotations

import signal
import sys


def _in_the_fork_server() -> bool:
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_the_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
