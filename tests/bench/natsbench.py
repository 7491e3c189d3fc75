"""NATS JetStream throughput: ours against what a user would write with nats-py, on the same
machine, the same messages and the same kind of stream (a local nats-server -js, file storage,
the Nats-Msg-Id header on every message, each acknowledged by a PubAck).

    python3 tests/bench/natsbench.py                 # about 2 minutes on 2 cores
    python3 tests/bench/natsbench.py --window 5      # shorter

Runs (msg/s counted from PubAcks over the window, after a warm-up):
  1. nats-py, `await js.publish()` per row (one request at a time);
  2. nats-py, `js.publish_async()` per row (its window of 4,000 outstanding acks);
  3. ours, 1 and 2 workers (telemetry-streamer --rate=0, read from its /stats/telemetry);
  4. ours, 1 and 2 workers on a 3-node cluster with an R3 stream.
The baselines get the messages ready-made (our envelopes, built before the clock starts), so
they pay for publishing only; ours reads and converts the CSV as well.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

from efficiency import cpu_seconds, tree  # noqa: E402
from natsserver import NatsServer, start_cluster  # noqa: E402

from streamer.csvsource import CsvSource  # noqa: E402
from streamer.message import Envelope  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "gpu_metrics.csv")
STREAM, SUBJECT = "TELEMETRY", "telemetry"


async def _reset_stream(url: str, replicas: int = 1) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    try:
        await js.delete_stream(STREAM)
    except Exception:
        pass
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], num_replicas=replicas, storage=StorageType.FILE, duplicate_window=120))
    await nc.close()


def reset_stream(url: str, replicas: int = 1) -> None:
    asyncio.run(_reset_stream(url, replicas))


def _messages(n: int = 20_000) -> list[bytes]:
    rows = CsvSource(SAMPLE, {}).take(n)
    return Envelope().batch(rows).split(b"\n")


async def _baseline(url: str, mode: str, warmup: float, window: float) -> float:
    import nats

    messages = _messages()
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    producer = os.urandom(16).hex()
    acked = 0

    def done(future) -> None:
        nonlocal acked
        if not future.cancelled() and future.exception() is None:
            acked += 1

    start = time.monotonic()
    counted_from = counted_at_start = None
    seq = 0
    while True:
        now = time.monotonic()
        if counted_from is None and now - start >= warmup:
            counted_from, counted_at_start, cpu_from = now, acked, time.process_time()
        if counted_from is not None and now - counted_from >= window:
            break
        for m in messages[:1000]:
            headers = {"Nats-Msg-Id": f"{producer}-{seq}"}
            seq += 1
            if mode == "publish":
                await js.publish(SUBJECT, m, headers=headers)
                acked += 1
            else:
                future = await js.publish_async(SUBJECT, m, headers=headers)
                future.add_done_callback(done)
        messages = messages[1000:] + messages[:1000]
    rate = (acked - counted_at_start) / (time.monotonic() - counted_from)
    per_cpu_s = (acked - counted_at_start) / max(time.process_time() - cpu_from, 1e-9)
    if mode != "publish":
        await asyncio.wait_for(js.publish_async_completed(), 60)
    await nc.close()
    return {"msg_s": rate, "per_cpu_s": per_cpu_s}


def baseline(url: str, mode: str, warmup: float, window: float) -> dict:
    import uvloop

    reset_stream(url)
    return uvloop.run(_baseline(url, mode, warmup, window))


def ours(url: str, workers: int, warmup: float, window: float, replicas: int = 1) -> dict:
    reset_stream(url.split(",")[0], replicas)
    args = [sys.executable, "-m", "streamer", f"--csv={SAMPLE}", f"--workers={workers}", "--rate=0", f"--broker-url={url}", "--http-port=0"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    http = None
    for line in proc.stderr:
        if match := re.search(r"HTTP (http://\S+) ", line):
            http = match.group(1)
            break
    if http is None:
        raise SystemExit(f"the streamer did not start: exit {proc.wait()}")
    import json
    import urllib.request

    def published() -> int:
        with urllib.request.urlopen(http + "/stats/telemetry", timeout=10) as response:
            return json.load(response)["published"]

    def workers_cpu_s() -> float:  # the worker processes' CPU time (the streamer's descendants: its fork server's children)
        return cpu_seconds([pid for pid in tree(proc.pid) if pid != proc.pid])

    time.sleep(warmup)
    first, cpu_first, started = published(), workers_cpu_s(), time.monotonic()
    time.sleep(window)
    second, cpu_second, elapsed = published(), workers_cpu_s(), time.monotonic() - started
    proc.send_signal(signal.SIGTERM)
    log = proc.stderr.read()
    code = proc.wait()
    drained = [line for line in log.splitlines() if "Drained:" in line]
    total = int(re.search(r"published=(\d+)", drained[-1]).group(1)) if drained else -1
    in_stream = asyncio.run(_stream_messages(url.split(",")[0]))
    return {
        "msg_s": (second - first) / elapsed,
        "per_cpu_s": (second - first) / max(cpu_second - cpu_first, 1e-9),
        "exit": code,
        "exact": code == 0 and total == in_stream,  # the stream holds exactly what the summary says
        "lost": total > in_stream,  # reported as published, not in the stream: must never happen
        "published": total,
        "in_stream": in_stream,
    }


async def _stream_messages(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(STREAM)
    await nc.close()
    return info.state.messages


def run(window: float = 10.0, warmup: float = 3.0, rounds: int = 3) -> tuple[list[tuple], list[tuple]]:
    """The rows of the NATS table and the targets, as run.py prints them. The runs the targets
    compare (the best nats-py loop, ours with 1 and 2 workers) repeat in rounds, back to back in
    each round, so that each ratio is read from the same moment's machine."""
    work = tempfile.mkdtemp(prefix="telemetry-nats-bench-")
    server = NatsServer(os.path.join(work, "single")).start()
    runs: dict[str, list[dict]] = {"sync": [], "async": [], "one": [], "two": []}
    try:
        runs["sync"].append(baseline(server.url, "publish", 1.0, min(window, 5.0)))
        for _ in range(rounds):
            runs["async"].append(baseline(server.url, "publish_async", warmup, window))
            runs["one"].append(ours(server.url, 1, warmup, window))
            runs["two"].append(ours(server.url, 2, warmup, window))
            print({name: [round(r["msg_s"]) for r in results] for name, results in runs.items()}, flush=True)
    finally:
        server.kill()
    servers, seeds = start_cluster(work)
    try:
        runs["r3 one"] = [ours(seeds, 1, warmup, window, replicas=3)]
        runs["r3 two"] = [ours(seeds, 2, warmup, window, replicas=3)]
    finally:
        for s in servers:
            s.kill()

    def median(name: str, key: str = "msg_s") -> float:
        return statistics.median(r[key] for r in runs[name])

    def spread(name: str) -> str:
        values = [r["msg_s"] for r in runs[name]]
        return f"{min(values):,.0f} - {max(values):,.0f}" if len(values) > 1 else ""

    def drain(name: str) -> str:
        if "exact" not in runs[name][0]:
            return ""
        if any(r["lost"] for r in runs[name]):
            return "**LOST MESSAGES**"
        late = [r for r in runs[name] if not r["exact"]]
        return "exact" if not late else f"exact, except {len(late)} drain(s) past --shutdown-timeout (unacknowledged, in the stream)"

    names = {
        "sync": "nats-py, await js.publish() per row",
        "async": "nats-py, js.publish_async() per row (4,000 outstanding)",
        "one": "ours, 1 worker",
        "two": "ours, 2 workers",
        "r3 one": "ours, 1 worker, 3-node cluster, R3 stream",
        "r3 two": "ours, 2 workers, 3-node cluster, R3 stream",
    }
    rows = [(label, f"{median(name):,.0f}", spread(name), f"{median(name, 'per_cpu_s'):,.0f}", drain(name)) for name, label in names.items()]
    best = [max(a["msg_s"], runs["sync"][0]["msg_s"]) for a in runs["async"]]
    vs_best = [o["msg_s"] / b for o, b in zip(runs["one"], best)]
    two_vs_one = [t["msg_s"] / o["msg_s"] for t, o in zip(runs["two"], runs["one"])]
    targets = [
        (
            "NATS: 1 worker >= 3 x the best nats-py loop",
            f"{statistics.median(vs_best):.2f} x (by round: {', '.join(f'{r:.2f}' for r in vs_best)})",
            statistics.median(vs_best) >= 3,
        ),
        (
            "NATS: 2 workers >= 1.6 x 1 worker",
            f"{statistics.median(two_vs_one):.2f} x (by round: {', '.join(f'{r:.2f}' for r in two_vs_one)})",
            statistics.median(two_vs_one) >= 1.6,
        ),
    ]
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows, targets = run(args.window, args.warmup, args.rounds)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| run (median of rounds) | msg/s | range msg/s | msg per publisher CPU second | drain |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| target | measured | met |\n|---|---|---|")
    for name, measured, ok in targets:
        print(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")


if __name__ == "__main__":
    main()
