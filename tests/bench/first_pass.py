"""First-pass parse speed of one CSV file: CsvSource.open_pass() over the whole file, no cache.

    python tests/bench/first_pass.py /work/shared/datasets/dcgm_sample.csv --runs=15

Reports the best of N runs in CPU time of the thread (time.thread_time), which a busy shared
machine disturbs far less than wall time. Repeated passes replay the first one's encoded rows:
tests/bench/throughput.py measures those.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from streamer.csvsource import CsvSource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    best, rows = float("inf"), 0
    for _ in range(args.runs):
        source = CsvSource(args.csv, {})
        started = time.thread_time()
        rows = sum(1 for _ in source.open_pass())
        best = min(best, time.thread_time() - started)
    size = os.path.getsize(args.csv)
    print(f"{args.csv}: {rows} rows, best CPU {best * 1000:.1f} ms = {rows / best:,.0f} rows/s, {size / best / 1e6:.1f} MB/s")


if __name__ == "__main__":
    main()
