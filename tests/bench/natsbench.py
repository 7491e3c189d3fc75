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
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from natsserver import NatsServer, cluster  # noqa: E402

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
            counted_from, counted_at_start = now, acked
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
    if mode != "publish":
        await asyncio.wait_for(js.publish_async_completed(), 30)
    await nc.close()
    return rate


def baseline(url: str, mode: str, warmup: float, window: float) -> float:
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

    time.sleep(warmup)
    first, started = published(), time.monotonic()
    time.sleep(window)
    second, elapsed = published(), time.monotonic() - started
    proc.send_signal(signal.SIGTERM)
    log = proc.stderr.read()
    code = proc.wait()
    drained = [line for line in log.splitlines() if "Drained:" in line]
    total = int(re.search(r"published=(\d+)", drained[-1]).group(1)) if drained else -1
    in_stream = asyncio.run(_stream_messages(url.split(",")[0]))
    return {"msg_s": (second - first) / elapsed, "exit": code, "lossless": code == 0 and total == in_stream, "published": total, "in_stream": in_stream}


async def _stream_messages(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(STREAM)
    await nc.close()
    return info.state.messages


def run(window: float = 10.0, warmup: float = 3.0, rounds: int = 1) -> tuple[list[tuple], list[tuple]]:
    """The rows of the NATS table and the targets, as run.py prints them."""
    work = tempfile.mkdtemp(prefix="telemetry-nats-bench-")
    rows, targets = [], []
    server = NatsServer(os.path.join(work, "single")).start()
    try:
        sync = baseline(server.url, "publish", 1.0, min(window, 5.0))
        print(f"nats-py publish: {sync:,.0f} msg/s", flush=True)
        pipelined = baseline(server.url, "publish_async", warmup, window)
        print(f"nats-py publish_async: {pipelined:,.0f} msg/s", flush=True)
        one_runs, two_runs = [], []
        for _ in range(rounds):  # 1 and 2 workers back to back in each round: a ratio from the same moment
            one_runs.append(ours(server.url, 1, warmup, window))
            two_runs.append(ours(server.url, 2, warmup, window))
            print(f"ours: 1 worker {one_runs[-1]}, 2 workers {two_runs[-1]}", flush=True)
    finally:
        server.kill()
    one = statistics.median(r["msg_s"] for r in one_runs)
    two = statistics.median(r["msg_s"] for r in two_runs)
    servers = cluster(work)
    try:
        for s in servers:
            s.start(ready=False)
        for s in servers:
            s.proc.wait_for_line("Server is ready", timeout=30)
        seeds = ",".join(s.url for s in servers)
        r3_one = ours(seeds, 1, warmup, window, replicas=3)
        r3_two = ours(seeds, 2, warmup, window, replicas=3)
    finally:
        for s in servers:
            s.kill()

    def drain(runs) -> str:
        return "lossless" if all(r["lossless"] for r in runs) else "NOT LOSSLESS " + str([(r["published"], r["in_stream"]) for r in runs])

    def spread(runs) -> str:
        return f"{min(r['msg_s'] for r in runs):,.0f} - {max(r['msg_s'] for r in runs):,.0f}" if len(runs) > 1 else ""

    rows = [
        ("nats-py, await js.publish() per row", f"{sync:,.0f}", "", ""),
        ("nats-py, js.publish_async() per row (4,000 outstanding)", f"{pipelined:,.0f}", "", ""),
        ("ours, 1 worker", f"{one:,.0f}", spread(one_runs), drain(one_runs)),
        ("ours, 2 workers", f"{two:,.0f}", spread(two_runs), drain(two_runs)),
        ("ours, 1 worker, 3-node cluster, R3 stream", f"{r3_one['msg_s']:,.0f}", "", drain([r3_one])),
        ("ours, 2 workers, 3-node cluster, R3 stream", f"{r3_two['msg_s']:,.0f}", "", drain([r3_two])),
    ]
    best = max(sync, pipelined)
    targets = [
        ("NATS: 1 worker >= 3 x the best nats-py loop", f"{one / best:.2f} x", one >= 3 * best),
        ("NATS: 2 workers >= 1.6 x 1 worker", f"{two / one:.2f} x", two >= 1.6 * one),
    ]
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rows, targets = run(args.window, args.warmup, args.rounds)
    print("| run | msg/s | range msg/s | drain |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| target | measured | met |\n|---|---|---|")
    for name, measured, ok in targets:
        print(f"| {name} | {measured} | {'yes' if ok else '**no**'} |")


if __name__ == "__main__":
    main()
