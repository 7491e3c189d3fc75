"""Cost at the quiet end, and the broker's memory: what issue 18's targets compare.

    python3 tests/bench/efficiency.py                 # about 2.5 minutes
    python3 tests/bench/efficiency.py --idle-window=10 --skip-memory   # a smoke run
    python3 tests/bench/efficiency.py --threads --idle-window=40 --skip-many --skip-memory   # where the idle CPU goes

  idle     `telemetry-streamer --csv=data/gpu_metrics.csv --workers=5 --rate=10 --persistence`:
           CPU of the whole process tree as % of one core over --idle-window seconds (target
           <= 1% over 60 s), and the tree's PSS (target <= 100 MB); with --threads also each
           thread's CPU (schedstat, nanoseconds) and wake-ups (voluntary context switches) a second;
  many     64 workers at 10 msg/s: seconds from start until the broker has heard from every
           worker (target <= 3 s), and the tree's PSS (target <= 1 GB);
  memory   the standalone broker's RSS with 1, 10 and 100 topics, and as one topic retains
           0 to 2 million messages in memory and with persistence.

CPU and memory come from /proc (utime+stime of every thread of every process in the tree;
smaps_rollup Pss), so the figures do not depend on how busy the machine is, only on the work done.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import orjson
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]

from throughput import stats  # noqa: E402

from broker import protocol as p  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "gpu_metrics.csv")


def tree(root: int) -> list[int]:
    """root and every descendant (Linux /proc)."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pending += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def name_of(pid: int) -> str:
    """The process's name (/proc/PID/comm: `worker-0`, `forkserver`), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def memory_mb(pids: list[int], field: str = "Pss") -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(field + ":"))
        except OSError:
            pass
    return total / 1024


def thread_counts(pids: list[int]) -> dict[tuple[int, int], tuple[str, int, int]]:
    """(pid, tid) -> (thread name, nanoseconds on a CPU, voluntary context switches)."""
    counts = {}
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                base = f"/proc/{pid}/task/{tid}"
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
                with open(f"{base}/schedstat") as f:
                    on_cpu = int(f.read().split()[0])
                with open(f"{base}/status") as f:
                    switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))
                counts[(pid, int(tid))] = (name, on_cpu, switches)
        except OSError:
            pass
    return counts


def _command() -> list[str]:
    """The installed `telemetry-streamer` (what users run: a script, which multiprocessing would
    run again in every worker), else `python -m streamer`."""
    script = os.path.join(os.path.dirname(sys.executable), "telemetry-streamer")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "streamer"]


def _streamer(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*_command(), f"--csv={SAMPLE}", "--broker-port=0", "--http-port=0", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if match := re.search(r"HTTP (http://\S+) ", line):
            return proc, match.group(1)
    raise SystemExit(f"the streamer did not start: exit {proc.wait()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.stderr.read()
    proc.wait(60)


def idle(window: float) -> dict:
    with tempfile.TemporaryDirectory() as data:
        proc, _ = _streamer("--workers=5", "--rate=10", "--persistence", f"--persistence-dir={data}")
        try:
            time.sleep(5)  # past start-up
            pids = tree(proc.pid)
            before, threads_before, started = cpu_seconds(pids), thread_counts(pids), time.monotonic()
            time.sleep(window)
            pids = tree(proc.pid)
            used, threads_after, elapsed = cpu_seconds(pids) - before, thread_counts(pids), time.monotonic() - started
            threads = [
                (pid, tid, name, 100 * (on_cpu - threads_before[(pid, tid)][1]) / 1e9 / elapsed, (switches - threads_before[(pid, tid)][2]) / elapsed)
                for (pid, tid), (name, on_cpu, switches) in sorted(threads_after.items())
                if (pid, tid) in threads_before
            ]
            return {"cpu_pct": 100 * used / elapsed, "pss_mb": memory_mb(pids), "processes": len(pids), "window_s": elapsed, "threads": threads}
        finally:
            _stop(proc)


def many(workers: int = 64) -> dict:
    started = time.monotonic()
    proc, http = _streamer(f"--workers={workers}", "--rate=10")
    try:
        while len(stats(http)["producers"]) < workers:
            if time.monotonic() - started > 120:
                raise SystemExit(f"{workers} workers did not all publish within 120 s")
            time.sleep(0.05)
        all_publishing = time.monotonic() - started
        time.sleep(3)
        pids = tree(proc.pid)
        return {"workers": workers, "all_publishing_s": all_publishing, "pss_mb": memory_mb(pids), "processes": len(pids)}
    finally:
        _stop(proc)


def _broker(*args: str) -> tuple[subprocess.Popen, str]:
    # --max-topics: 100 topics reach the default limit, which these figures ground
    cmd = [sys.executable, "-m", "broker", "serve", "--port=0", "--http-port=0", "--max-topics=1000", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if match := re.search(r"ZeroMQ (\S+), HTTP", line):
            return proc, match.group(1).rstrip(",")
    raise SystemExit(f"the broker did not start: exit {proc.wait()}")


def _fill(url: str, topics: list[str], messages: int, batch: int = 4000) -> None:
    """Publish `messages` sample-sized messages into each topic, waiting for every acknowledgment."""
    row = orjson.dumps({"timestamp": "2025-10-17T13:27:41.129926216Z", "fields": {"gpu_id": 0, "utilization": 45.5, "hostname": "node-1", "x": "y" * 120}})
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(url)
    try:
        for topic in topics:
            producer = os.urandom(p.PRODUCER_ID_BYTES)
            for first in range(0, messages, batch):
                count = min(batch, messages - first)
                dealer.send_multipart(p.publish_frames(topic.encode(), producer, first, count, b"\n".join([row] * count)))
                reply = dealer.recv_multipart()
                assert reply[1] == p.ACK, reply
    finally:
        dealer.close(linger=0)
        ctx.term()


def broker_memory() -> dict:
    results = {}
    for topics in (1, 10, 100):
        proc, url = _broker()
        try:
            names = [f"t{i}" for i in range(topics)]
            _fill(url, names, 1)
            results[f"{topics} topics, 1 message each"] = memory_mb([proc.pid], "Rss")
        finally:
            _stop(proc)
    for persistence in (False, True):
        with tempfile.TemporaryDirectory() as data:
            proc, url = _broker(*(["--persistence", f"--persistence-dir={data}"] if persistence else []))
            try:
                where = "with persistence" if persistence else "in memory"
                results[f"1 topic, 0 messages, {where}"] = memory_mb([proc.pid], "Rss")
                filled = 0
                for total in (500_000, 1_000_000, 2_000_000):
                    _fill(url, ["telemetry"], total - filled)
                    filled = total
                    results[f"1 topic, {total:,} messages, {where}"] = memory_mb([proc.pid], "Rss")
            finally:
                _stop(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-window", type=float, default=60.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-many", action="store_true")
    parser.add_argument("--threads", action="store_true", help="also each thread's CPU and wake-ups in the idle run")
    args = parser.parse_args()
    result = idle(args.idle_window)
    print(
        f"idle: 5 workers x 10 msg/s, persistence: {result['cpu_pct']:.2f}% of one core over {result['window_s']:.0f} s, "
        f"{result['pss_mb']:.0f} MB PSS in {result['processes']} processes"
    )
    if args.threads:
        for pid, tid, name, cpu_pct, wakeups in result["threads"]:
            if cpu_pct or wakeups:
                print(f"  pid {pid:>7} thread {tid:>7} {name:<16} {cpu_pct:5.2f}% of a core {wakeups:6.1f} wake-ups/s")
        print(f"  all threads: {sum(t[3] for t in result['threads']):.2f}% of a core, {sum(t[4] for t in result['threads']):.1f} wake-ups/s")
    if not args.skip_many:
        result = many()
        print(
            f"many: {result['workers']} workers all publishing {result['all_publishing_s']:.1f} s after start, "
            f"{result['pss_mb']:.0f} MB PSS in {result['processes']} processes"
        )
    if not args.skip_memory:
        for what, mb in broker_memory().items():
            print(f"broker RSS: {what}: {mb:.0f} MB")


if __name__ == "__main__":
    main()
