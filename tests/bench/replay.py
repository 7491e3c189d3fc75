"""Replay accuracy through the real CLI (docs/replay.md reports it): pacing and load profiles.

    python tests/bench/replay.py pacing --rows-per-second=50000 --seconds=20 --group=8
    python tests/bench/replay.py profile --profile="ramp 500 5000 10s; hold 5000 10s; burst 10000 1s every 5s for 10s; ramp 5000 0 10s"

pacing: writes a recording (`--group` rows per timestamp, `--rows-per-second` rows per second),
replays it once with --pace=timestamps --timestamps=now and --persistence, and compares each
message's send time (its timestamp, taken as it is built) with when it was due (its own time
relative to the first row's): lateness percentiles, and the same over the last 10% of the run
(drift). profile: runs the profile once with --persistence and counts the messages per step
by their send times, against each step's integral.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from streamer.profile import parse_profile  # noqa: E402
from streamer.timestamps import parse_time_ns  # noqa: E402

T0 = 1_760_707_661_000_000_000
RUN_TIMEOUT_S = 3 * 3600  # an hour-long pacing run (issue 17: no drift over an hour) and its dump


def run(args: list[str], data: str) -> list[dict]:
    cmd = [sys.executable, "-m", "streamer", "--broker-port=0", "--http-port=0", "--no-progress", "--persistence", f"--persistence-dir={data}", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise SystemExit(f"the streamer exited {done.returncode}:\n{done.stderr[-2000:]}")
    out = subprocess.run(
        [sys.executable, "-m", "broker", "dump", f"--persistence-dir={data}"], cwd=ROOT, capture_output=True, timeout=RUN_TIMEOUT_S, check=True
    )
    return [orjson.loads(line) for line in out.stdout.splitlines()]


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def pacing(ns) -> None:
    interval_ns = round(1e9 * ns.group / ns.rows_per_second)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recording.csv")
        with open(path, "w") as f:
            f.write("timestamp,gpu,value\n")
            for i in range(int(ns.seconds * ns.rows_per_second / ns.group)):
                t = T0 + i * interval_ns
                f.writelines(f"{t},{g},{i % 100}\n" for g in range(ns.group))
        messages = run([f"--csv={path}", "--once", "--pace=timestamps", f"--speed={ns.speed}", "--timestamps=now"], os.path.join(tmp, "data"))
    sent = [parse_time_ns(m["timestamp"]) for m in messages]
    due = [(parse_time_ns(m["fields"]["timestamp"]) - T0) / ns.speed for m in messages]
    # the schedule's origin: the earliest send relative to its due time (the first row may itself be late)
    origin = min(s - d for s, d in zip(sent, due))
    late_ms = [(s - origin - d) / 1e6 for s, d in zip(sent, due)]
    tail = late_ms[int(len(late_ms) * 0.9) :]
    print(f"pacing: {len(messages):,} rows over {ns.seconds:g} s ({ns.rows_per_second:,} rows/s, {ns.group} per timestamp, speed {ns.speed:g})")
    print(
        f"  lateness vs schedule (ms): p50 {percentile(late_ms, 50):.2f}  p99 {percentile(late_ms, 99):.2f}  p99.9 {percentile(late_ms, 99.9):.2f}  max {max(late_ms):.2f}"
    )
    print(f"  last 10% of the run (drift): p50 {percentile(tail, 50):.2f}  p99 {percentile(tail, 99):.2f}  max {max(tail):.2f}")
    worst: dict[int, float] = {}  # second of the schedule -> its latest row (one pass: hour-long runs have millions)
    for x, d in zip(late_ms, due):
        second = int(d / 1e9)
        worst[second] = max(x, worst.get(second, x))
    if len(worst) <= 120:
        print("  max lateness per second of the schedule (ms): " + " ".join(f"{worst[k]:.0f}" for k in sorted(worst)))
    else:
        print(f"  seconds of the schedule with a row over 5 ms late: {sum(1 for v in worst.values() if v > 5.0)} of {len(worst)}")
    within = sum(1 for x in late_ms if x <= 5.0) / len(late_ms)
    print(f"  within 5 ms: {within:.2%}")


def profile(ns) -> None:
    steps = parse_profile(ns.profile).steps
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.csv")
        with open(path, "w") as f:
            f.write("i,v\n")
            f.writelines(f"{i},{i % 7}\n" for i in range(10_000))
        messages = run([f"--csv={path}", f"--profile={ns.profile}", f"--workers={ns.workers}"], os.path.join(tmp, "data"))
    sent = sorted(parse_time_ns(m["timestamp"]) for m in messages)
    start = sent[0]
    t = 0.0
    worst = 0.0
    for step in steps:
        a, b = start + t * 1e9, start + (t + step.duration) * 1e9
        got = sum(1 for s in sent if a <= s < b)
        error = (got - step.total) / step.total if step.total else 0.0
        worst = max(worst, abs(error))
        print(f"  {step.text():45s} expected {step.total:10,.0f}  sent {got:10,}  ({error:+.3%})")
        t += step.duration
    print(f"profile: {len(sent):,} messages, {ns.workers} workers; worst step {worst:.3%} from its integral")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pacing")
    p.add_argument("--rows-per-second", type=int, default=50_000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--speed", type=float, default=1.0)
    q = sub.add_parser("profile")
    q.add_argument("--profile", default="ramp 500 5000 10s; hold 5000 10s; burst 10000 1s every 5s for 10s; ramp 5000 0 10s")
    q.add_argument("--workers", type=int, default=2)
    ns = parser.parse_args()
    pacing(ns) if ns.what == "pacing" else profile(ns)


if __name__ == "__main__":
    main()
