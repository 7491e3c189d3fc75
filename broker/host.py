"""Process-wide settings a broker makes once at start, as servers do."""

from __future__ import annotations

import ctypes
import resource

OPEN_FILES_WANTED = 65536

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_KEEP_BYTES = 64 << 20  # freed heap memory kept for reuse instead of returned to the OS
HEAP_MMAP_FROM_BYTES = 32 << 20  # allocations from this size get their own mapping (glibc's maximum)


def raise_open_files_limit() -> None:
    """Raise the soft limit on open descriptors towards the hard limit: every connection is a
    descriptor, and a flood of connections must not starve the log of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def keep_freed_memory(keep_bytes: int = HEAP_KEEP_BYTES) -> bool:
    """Let glibc's malloc keep freed memory for the next batch instead of returning it at once.

    Every batch the broker receives is a fresh buffer of up to a few MB (ZeroMQ's, then Python's
    bytes), freed once it is written or delivered. By default glibc gives the top of the heap back
    to the OS past 128 KiB free, so the next batch faults the same pages in again, one by one: in
    the broker with --persistence that was a third of its CPU (measured: 972 -> 663 us per 4,000-
    message batch). Setting both thresholds also switches off glibc's sliding thresholds, so the
    behaviour does not depend on what was allocated first. The cost is up to HEAP_KEEP_BYTES of
    resident memory the broker keeps between bursts. Workers do the same with their batch bodies
    (built, sent, held until acknowledged, freed: streamer.worker keeps up to twice its publisher's
    window). Returns False where the C library has no mallopt (musl, macOS): nothing to tune there.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_FROM_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, keep_bytes))
