"""End-to-end throughput of the real CLI: streamer + embedded broker, read through /stats.

    python tests/bench/throughput.py --csv=data/gpu_metrics.csv --workers=1 --rate=0

Starts telemetry-streamer on free ports with the given options, waits `--warmup` seconds,
reads /stats/telemetry twice `--window` seconds apart, sends SIGTERM and checks the drain
(published == broker_accepted). Not part of the default test run; tests/bench/run.py uses it.

    --standalone         the streamer publishes (--broker-url, TCP) to a `telemetry-broker serve`
    --standalone=curve   ... with CURVE on: keys made with `telemetry-broker keygen` in a temporary
                         directory, the streamer's key allowed (SECURITY.md)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def start(streamer_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    """The streamer with its embedded broker on free ports: (process, HTTP URL, ZeroMQ URL)."""
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "--broker-port=0", "--http-port=0", *streamer_args], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if match := re.search(r"ZeroMQ (\S+), HTTP (http://\S+) ", line):
            return proc, match.group(2), match.group(1)
    raise SystemExit(f"the streamer did not start: exit {proc.wait()}")


def start_standalone(streamer_args: list[str], curve: bool, keys: str) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """A standalone broker (with CURVE if asked) and the streamer publishing to it over TCP:
    (streamer, broker, the broker's HTTP URL)."""
    broker_args, client_args = [], []
    if curve:
        for name in ("broker", "streamer"):
            subprocess.run([sys.executable, "-m", "broker", "keygen", keys, f"--name={name}"], check=True, capture_output=True)
        os.makedirs(os.path.join(keys, "authorized"))
        os.rename(os.path.join(keys, "streamer.key"), os.path.join(keys, "authorized", "streamer.key"))
        broker_args = [f"--curve-secret-key={keys}/broker.key_secret", f"--curve-authorized-keys={keys}/authorized"]
        client_args = [f"--curve-server-key={keys}/broker.key", f"--curve-client-key={keys}/streamer.key_secret"]
    broker = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--port=0", "--http-port=0", *broker_args], stderr=subprocess.PIPE, text=True)
    for line in broker.stderr:
        if match := re.search(r"ZeroMQ (\S+), HTTP (http://\S+) ", line):
            break
    else:
        raise SystemExit(f"the broker did not start: exit {broker.wait()}")
    zmq_url, http = match.group(1).rstrip(","), match.group(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", f"--broker-url={zmq_url}", "--http-port=0", *client_args, *streamer_args], stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if "Streamer HTTP" in line:
            return proc, broker, http
    broker.kill()
    raise SystemExit(f"the streamer did not start: exit {proc.wait()}")


def stats(http: str) -> dict:
    with urllib.request.urlopen(http + "/stats/telemetry", timeout=10) as response:
        return json.load(response)


def stop(proc: subprocess.Popen) -> tuple[int, bool, str]:
    """SIGTERM, wait; returns (exit code, lossless drain, summary line)."""
    proc.send_signal(signal.SIGTERM)
    log = proc.stderr.read()
    code = proc.wait()
    drained = [line for line in log.splitlines() if "Drained:" in line or "Forced exit:" in line]
    figures = dict(re.findall(r"\b(published|broker_accepted)=(\d+)", drained[-1])) if drained else {}
    lossless = bool(figures) and figures["published"] == figures.get("broker_accepted")
    return code, lossless, drained[-1].split("INFO")[-1].strip() if drained else "no summary"


def measure(streamer_args: list[str], warmup: float = 3.0, window: float = 10.0, standalone: str | None = None) -> dict:
    broker = None
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as keys:
        if standalone is None:
            proc, http, _ = start(streamer_args)
        else:
            proc, broker, http = start_standalone(streamer_args, standalone == "curve", keys)
        try:
            time.sleep(warmup)
            first, started = stats(http), time.monotonic()
            time.sleep(window)
            second, elapsed = stats(http), time.monotonic() - started
        finally:
            code, lossless, summary = stop(proc)
            if broker is not None:  # no broker_accepted in the summary: compare with the broker's count
                published = re.search(r"published=(\d+) .*unacknowledged=(\d+)", summary)
                lossless = bool(published) and published.group(2) == "0" and int(published.group(1)) == stats(http)["messages"]
                broker.send_signal(signal.SIGTERM)
                broker.communicate(timeout=30)
    return {
        "msg_s": (second["messages"] - first["messages"]) / elapsed,
        "mb_s": (second["bytes"] - first["bytes"]) / 1e6 / elapsed,
        "exit": code,
        "lossless": lossless,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument(
        "--standalone", nargs="?", const="plain", choices=("plain", "curve"), help="publish to a standalone broker over TCP (curve: with CURVE)"
    )
    ours, streamer_args = parser.parse_known_args()
    result = measure(streamer_args, ours.warmup, ours.window, ours.standalone)
    print(
        f"{' '.join(streamer_args)}{' standalone=' + ours.standalone if ours.standalone else ''}: {result['msg_s']:,.0f} msg/s, {result['mb_s']:,.1f} MB/s; exit {result['exit']}; "
        f"drain {'lossless' if result['lossless'] else 'NOT lossless'}: {result['summary']}"
    )
    sys.exit(0 if result["exit"] == 0 and result["lossless"] else 1)


if __name__ == "__main__":
    main()
