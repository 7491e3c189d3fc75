"""End-to-end throughput of the real CLI: streamer + embedded broker, read through /stats.

    python tests/bench/throughput.py --csv=data/gpu_metrics.csv --workers=1 --rate=0

Starts telemetry-streamer on free ports with the given options, waits `--warmup` seconds,
reads /stats/telemetry twice `--window` seconds apart, sends SIGTERM and checks the drain
(published == broker_accepted). Not part of the default test run.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=10.0)
    ours, streamer_args = parser.parse_known_args()
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "--broker-port=0", "--http-port=0", *streamer_args], stderr=subprocess.PIPE, text=True)
    http = None
    for line in proc.stderr:
        if match := re.search(r"HTTP (http://\S+) ", line):
            http = match.group(1)
            break
    if http is None:
        sys.exit(f"the streamer did not start: exit {proc.wait()}")

    def stats() -> dict:
        with urllib.request.urlopen(http + "/stats/telemetry", timeout=10) as response:
            return json.load(response)

    time.sleep(ours.warmup)
    first, started = stats(), time.monotonic()
    time.sleep(ours.window)
    second, elapsed = stats(), time.monotonic() - started
    proc.send_signal(signal.SIGTERM)
    log = proc.stderr.read()
    code = proc.wait()
    messages = second["messages"] - first["messages"]
    megabytes = (second["bytes"] - first["bytes"]) / 1e6
    drained = [line for line in log.splitlines() if "Drained:" in line or "Forced exit:" in line]
    figures = dict(re.findall(r"\b(published|broker_accepted)=(\d+)", drained[-1])) if drained else {}
    lossless = bool(figures) and figures["published"] == figures.get("broker_accepted")
    print(
        f"{' '.join(streamer_args)}: {messages / elapsed:,.0f} msg/s, {megabytes / elapsed:,.1f} MB/s over {elapsed:.1f} s; "
        f"exit {code}; drain {'lossless' if lossless else 'NOT lossless'}: {drained[-1].split('INFO')[-1].strip() if drained else 'no summary'}"
    )
    sys.exit(0 if code == 0 and lossless else 1)


if __name__ == "__main__":
    main()
