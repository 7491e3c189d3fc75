"""What a segment file costs to write: a new file per segment (and the oldest deleted) against
a retired segment's file overwritten (broker/segmentlog.py recycles them).

    python3 tests/bench/pagecache.py [--dir DIR] [--gib 4] [--rounds 2]

Writes --gib GiB in 650 KB pwritev calls (a 4,000-row batch of the sample) into 64 MiB segments,
keeping 16 (the default --retention-bytes of 1 GiB), and prints the CPU time this process spent
(user + system, from os.times: the kernel's page-cache work is done in the writing thread) and
what that is per GiB. The flusher threads' writeback is the same in both and not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

SEGMENT = 64 << 20
KEEP = 16
CHUNK = os.urandom(650_000)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def write(directory: str, total: int, recycle: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to write `total` bytes as a log with retention would."""
    segments: list[str] = []
    fd, size, written, index = -1, 0, 0, 0
    spare = os.path.join(directory, "recycled")
    cpu, wall = _cpu(), time.monotonic()
    while written < total:
        if fd < 0 or size + len(CHUNK) > SEGMENT:
            if fd >= 0:
                os.ftruncate(fd, size)
                os.close(fd)
            path = os.path.join(directory, f"{index:020d}.log")
            index += 1
            if recycle and os.path.exists(spare):
                os.rename(spare, path)
                fd = os.open(path, os.O_WRONLY)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            size = 0
            segments.append(path)
            while len(segments) > KEEP:
                oldest = segments.pop(0)
                os.rename(oldest, spare) if recycle else os.unlink(oldest)
        os.pwritev(fd, [CHUNK], size)
        size += len(CHUNK)
        written += len(CHUNK)
    os.close(fd)
    return _cpu() - cpu, time.monotonic() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    total = int(args.gib * (1 << 30))
    print("| round | segments | CPU s | wall s | CPU ms per GiB |\n|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        for recycle in (False, True):
            directory = tempfile.mkdtemp(prefix="telemetry-pagecache-", dir=args.dir)
            try:
                cpu, wall = write(directory, total, recycle)
            finally:
                shutil.rmtree(directory)
            kind = "recycled (overwritten)" if recycle else "new file, oldest deleted"
            print(f"| {round_} | {kind} | {cpu:.2f} | {wall:.2f} | {cpu * 1000 / args.gib:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
