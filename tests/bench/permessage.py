"""CPU per message, streamer (with its embedded broker) and workers apart, with and without
persistence: what persistence costs in throughput and in CPU, measured in alternation so that
each round compares the same moment's machine.

    python3 tests/bench/permessage.py                  # 2 workers, 2 rounds, about 1 minute
    python3 tests/bench/permessage.py --workers=1 --rounds=3
    python3 tests/bench/permessage.py --rounds=4 --root=/tmp/before --root=$PWD   # before/after A/B

Each run: `--rate=0` on data/gpu_metrics.csv, 3 s warm-up, then an 8 s window; messages from the
broker's /stats, CPU (utime + stime) from /proc for the streamer's process and for the rest of
its tree (the fork server, idle, and the workers). --root runs the streamer of another checkout
(e.g. `git worktree add /tmp/before <commit>`) on this checkout's CSV; the rounds alternate
between them too, in reverse order every other round.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE]

from efficiency import cpu_seconds, tree  # noqa: E402
from throughput import stats  # noqa: E402


def measure(workers: int, persistence_dir: str | None, warmup: float = 3.0, window: float = 8.0, root: str = ROOT) -> tuple[float, float, float]:
    """(msg/s, streamer µs per message, workers µs per message)."""
    extra = ["--persistence", f"--persistence-dir={persistence_dir}"] if persistence_dir else []
    cmd = [
        sys.executable,
        "-m",
        "streamer",
        f"--csv={ROOT}/data/gpu_metrics.csv",  # the same rows for every checkout
        f"--workers={workers}",
        "--rate=0",
        "--broker-port=0",
        "--http-port=0",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, text=True)  # `-m streamer` imports root's
    try:
        for line in proc.stderr:
            if match := re.search(r"HTTP (http://\S+) ", line):
                url = match.group(1)
                break
        else:
            raise SystemExit(f"the streamer did not start: exit {proc.wait()}")
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        time.sleep(warmup)
        pids = tree(proc.pid)
        before, main0, all0, t0 = stats(url)["messages"], cpu_seconds([proc.pid]), cpu_seconds(pids), time.monotonic()
        time.sleep(window)
        after, main1, all1, t1 = stats(url)["messages"], cpu_seconds([proc.pid]), cpu_seconds(pids), time.monotonic()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    n = after - before
    if n <= 0:
        raise SystemExit(f"no message was acknowledged in the {window:.0f} s window")
    main, rest = main1 - main0, (all1 - all0) - (main1 - main0)
    return n / (t1 - t0), main / n * 1e6, rest / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--root", action="append", help="a checkout whose streamer to run (repeatable; default: this one)")
    args = parser.parse_args()
    roots = list(dict.fromkeys(os.path.abspath(r) for r in args.root or [ROOT]))
    results: dict[tuple[str, bool], list[tuple[float, float, float]]] = {(r, p): [] for r in roots for p in (True, False)}
    for round_ in range(args.rounds):
        for root in roots if round_ % 2 == 0 else roots[::-1]:  # a drift in the machine's speed favours neither
            for persistence in (True, False):
                log_dir = tempfile.mkdtemp(prefix="permessage-") if persistence else None
                try:
                    result = measure(args.workers, log_dir, window=args.window, root=root)
                finally:
                    if log_dir:
                        shutil.rmtree(log_dir, ignore_errors=True)
                results[root, persistence].append(result)
                rate, streamer_us, workers_us = result
                label = "with persistence" if persistence else "without        "
                where = f"{root}: " if len(roots) > 1 else ""
                print(
                    f"round {round_ + 1}: {where}{label}: {rate / 1e6:.3f} M msg/s; streamer and broker {streamer_us:.3f} µs/msg, workers {workers_us:.3f} µs/msg",
                    flush=True,
                )
    for root in roots:
        with_, without = results[root, True], results[root, False]
        cost = [1 - w[0] / o[0] for w, o in zip(with_, without)]
        median = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
        print(
            f"{root}: medians {median(with_, 0) / 1e6:.3f} M msg/s with persistence, {median(without, 0) / 1e6:.3f} M without "
            f"(cost {(1 - median(with_, 0) / median(without, 0)) * 100:.1f}%; by round {', '.join(f'{c * 100:.1f}%' for c in cost)}); "
            f"CPU per message {median(with_, 1) + median(with_, 2):.3f} µs with, {median(without, 1) + median(without, 2):.3f} µs without"
        )


if __name__ == "__main__":
    main()
