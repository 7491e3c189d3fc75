"""A topic's disk-persisted log: segmented, checksummed, recovered after a crash, bounded.

Directory: <persistence-dir>/<topic>/
    00000000000000000000.log      segment: record batches, named by its first offset
    00000000000000000000.index    sparse index of that segment (rebuilt whenever in doubt)

Each producer batch the broker accepts is one *record batch*, written with one write call. It
is the unit of writing, checksumming and acknowledgment (as in Kafka's record batch v2): a
batch is acknowledged only once it is wholly in the log, so a batch that is torn or fails its
CRC was never acknowledged, and recovery drops it whole. Every record in it carries its offset,
producer id, sequence number, receive time and length through the header:

    offset  size  field
    0       4     magic        b"TLB2" (CRC-32C) or b"TLB1" (CRC-32)
    4       4     crc          checksum of bytes 8.. to the end of the payload, by the magic
    8       4     length       payload bytes
    12      8     base offset  offset of the first record; record i has base offset + i
    20      4     count        records in the batch (>= 1)
    24      16    producer     producer id
    40      8     base seq     sequence number of the first record; record i has base seq + i
    48      8     received     broker's receive time, ns since the Unix epoch (all records)
    56      ...   payload      the records' JSON bytes, unchanged, joined by b"\\n"
                               (a record holds no raw newline); record i's length is its part's

The checksum is CRC-32C (Castagnoli, as Kafka's record batch v2), computed by google-crc32c
with the CPU's CRC instructions: 34 us for a 700 KB batch against zlib's CRC-32 at 139 us,
which was a fifth of the broker's cost of persisting a batch. Batches marked b"TLB1" carry
zlib's CRC-32: logs written before CRC-32C, and logs written where google-crc32c has no compiled
implementation (its pure-Python fallback is far too slow to write with). Both kinds are read and
recovered alike, also mixed in one segment.

Index entries (16 B, big-endian): base offset (u64) | file position (u64), one at least every
INDEX_INTERVAL bytes of segment, so a read from an offset seeks, then scans at most that much.

Recycled segments: retention does not delete the oldest segment's file but renames it to
`recycled.log`, and the next segment to start takes that file over and overwrites it (as
PostgreSQL recycles its WAL segments), unless --retention-age is set (then no record may
outlive the age on disk, so retired files are deleted). Writing over pages the page cache already holds costs a
third of the CPU of writing a new file and deleting an old one (new pages to allocate and zero,
blocks to allocate, old pages to free): see docs/BENCHMARKS.md. So the active segment's file
may hold, past the end of what was written, the remains of an older segment. Every reader tells
them apart by offset: a segment's batches start at its base offset and follow each other
without a gap, while the remains carry offsets below its base. The writer trims the file to what
it wrote when the segment closes, and at shutdown.

Recovery: at start the newest segment is validated batch by batch from its start (magic,
length, CRC, offsets contiguous); the first bad batch and everything after it are truncated
away and the number of bytes dropped is kept for the stats (a recycled file's remains are not
counted: they were never written by this segment). Older segments are walked by their
headers; a damaged batch in one is reported and skipped by readers (they resynchronise on the
next valid batch), and never stops the broker.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import google_crc32c

from .protocol import message_count
from .safefs import make_private_dir, open_fd, open_read

log = logging.getLogger("broker.segmentlog")

MAGIC_CRC32C, MAGIC_CRC32 = b"TLB2", b"TLB1"
_MAGIC_PREFIX = b"TLB"  # what a resynchronising reader looks for; the batch's CRC then decides
CHECKSUMS = {  # magic -> checksum(data, running value)
    MAGIC_CRC32C: lambda data, value=0: google_crc32c.extend(value, data),
    MAGIC_CRC32: zlib.crc32,
}
MAGIC = MAGIC_CRC32C if google_crc32c.implementation == "c" else MAGIC_CRC32  # what appends write
HEADER = struct.Struct(">4sII Q I 16s Q Q")
HEADER_SIZE = HEADER.size  # 56
_CRC_FROM = 8
INDEX_ENTRY = struct.Struct(">QQ")
INDEX_INTERVAL = 64 << 10
MAX_BATCH_PAYLOAD = 256 << 20
SEGMENT_SUFFIX, INDEX_SUFFIX = ".log", ".index"
RECYCLED_NAME = "recycled" + SEGMENT_SUFFIX  # a retired segment's file, waiting to be overwritten
FSYNC_POLICIES = ("always", "interval", "never")


def encode_batch(base_offset: int, producer: bytes, base_seq: int, received_ns: int, count: int, payload: bytes, magic: bytes | None = None) -> bytes:
    """The header for one batch (the payload follows it), checksummed as `magic` says (MAGIC)."""
    magic = magic or MAGIC
    header = HEADER.pack(magic, 0, len(payload), base_offset, count, producer, base_seq, received_ns)
    checksum = CHECKSUMS[magic]
    crc = checksum(payload, checksum(header[_CRC_FROM:]))
    return header[:4] + crc.to_bytes(4, "big") + header[8:]


@dataclass(slots=True)
class Batch:
    position: int  # where the batch starts in its segment
    base_offset: int
    count: int
    producer: bytes
    base_seq: int
    received_ns: int
    payload: bytes

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.count


def read_batch(f, position: int, *, verify: bool = True) -> Batch | None:
    """The batch at `position` of an open segment, or None if it is torn, corrupt or absent."""
    f.seek(position)
    header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return None
    magic, crc, length, base_offset, count, producer, base_seq, received = HEADER.unpack(header)
    checksum = CHECKSUMS.get(magic)
    if checksum is None or count < 1 or length > MAX_BATCH_PAYLOAD:
        return None
    payload = f.read(length)
    if len(payload) < length:
        return None
    if verify and checksum(payload, checksum(header[_CRC_FROM:])) != crc:
        return None
    if verify and message_count(payload) != count:
        return None
    return Batch(position, base_offset, count, producer, base_seq, received, payload)


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


def segment_base(path: str) -> int | None:
    """The base offset a segment's file name says, or None for another name."""
    stem, suffix = os.path.splitext(os.path.basename(path))
    return int(stem) if suffix == SEGMENT_SUFFIX and stem.isdigit() and len(stem) == 20 else None


def list_segments(directory: str) -> list[int]:
    """Base offsets of the segments in a topic directory, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(base for base in map(segment_base, names) if base is not None)


class Segment:
    """One segment file and its sparse index, as the writer sees them."""

    def __init__(self, directory: str, base_offset: int):
        self.base_offset = base_offset
        self.path = os.path.join(directory, segment_name(base_offset) + SEGMENT_SUFFIX)
        self.index_path = os.path.join(directory, segment_name(base_offset) + INDEX_SUFFIX)
        self.size = 0
        self.next_offset = base_offset
        self.index: list[tuple[int, int]] = []  # (base offset, position)
        self._indexed_at = -INDEX_INTERVAL
        self.fd = -1
        self.index_fd = -1

    def open(self) -> None:
        """Open (create) the segment and its index: 0600, never through a symbolic link."""
        make_private_dir(os.path.dirname(self.path))  # recreated if someone removed it
        fd = open_fd(self.path, os.O_RDWR | os.O_CREAT)
        try:
            self.index_fd = open_fd(self.index_path, os.O_RDWR | os.O_CREAT)
            for descriptor in (fd, self.index_fd):
                if os.fstat(descriptor).st_mode & 0o077:  # written by an older version: 0644
                    os.fchmod(descriptor, 0o600)
        except OSError:
            os.close(fd)
            if self.index_fd >= 0:
                os.close(self.index_fd)
                self.index_fd = -1
            raise
        self.fd = fd

    def note_batch(self, base_offset: int, position: int, size: int, count: int) -> bytes:
        """Account for a batch written at `position`; returns an index entry to write, or b""."""
        self.size = position + size
        self.next_offset = base_offset + count
        if position - self._indexed_at >= INDEX_INTERVAL:
            self._indexed_at = position
            self.index.append((base_offset, position))
            return INDEX_ENTRY.pack(base_offset, position)
        return b""

    def rewrite_index(self) -> None:
        data = b"".join(INDEX_ENTRY.pack(o, p) for o, p in self.index)
        os.ftruncate(self.index_fd, 0)
        os.pwrite(self.index_fd, data, 0)

    def close(self) -> None:
        for fd in (self.fd, self.index_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.index_fd = -1


class LogUnavailable(Exception):
    """The log cannot take writes now (disk full, permissions, I/O error); retry later."""


class TopicLog:
    """The writer's view of one topic's log: recover, append, sync, roll, retain."""

    def __init__(self, directory: str, *, segment_bytes: int, fsync: str, fsync_interval_s: float, retention_bytes: int, retention_age_s: float | None):
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.retention_bytes = retention_bytes
        self.retention_age_s = retention_age_s
        self.segments: list[int] = []  # base offsets of closed segments, oldest first
        self.sizes: dict[int, int] = {}  # bytes of each closed segment
        self.active: Segment | None = None
        self.recovered_dropped_bytes = 0
        self.last_fsync = time.monotonic()
        self.dirty = False  # written since the last fsync
        self.error: str | None = None  # the last write error, until a write succeeds
        self.producers: dict[bytes, int] = {}  # producer id -> next sequence number, from the log
        # runs blocking housekeeping (a rolled segment's fsync, retention's unlinks) off the
        # caller's thread; the broker sets it to its event loop's executor. None: run inline.
        self.background: Callable[[Callable[[], None]], object] | None = None

    # -- recovery ------------------------------------------------------------------------------

    def open(self) -> None:
        """Create or recover the topic directory (0700, a real directory inside its parent).
        Raises OSError if it is unusable, or holds a symbolic link where a file of the log should be."""
        make_private_dir(self.directory, os.path.dirname(self.directory))
        probe = os.path.join(self.directory, ".writable")
        os.close(open_fd(probe, os.O_WRONLY | os.O_CREAT))  # never through a link: no truncation
        os.unlink(probe)
        bases = list_segments(self.directory)
        for base in bases[:-1]:
            self.segments.append(base)
            self.sizes[base] = self._walk_older(base)
        self.active = Segment(self.directory, bases[-1] if bases else 0)
        self.active.open()
        self._recover_active()

    def _walk_older(self, base: int) -> int:
        """Learn producers' sequence numbers from a closed segment's headers; report damage."""
        path = os.path.join(self.directory, segment_name(base) + SEGMENT_SUFFIX)
        with open_read(path) as f:
            for batch in scan(f, path, verify=False):
                self.producers[batch.producer] = max(self.producers.get(batch.producer, 0), batch.base_seq + batch.count)
            return f.seek(0, os.SEEK_END)

    def _recover_active(self) -> None:
        seg = self.active
        expected = seg.base_offset
        position = 0
        with open_read(seg.path) as f:
            end = f.seek(0, os.SEEK_END)
            while True:
                batch = read_batch(f, position)
                if batch is None or batch.base_offset != expected:
                    break
                seg.note_batch(batch.base_offset, position, batch.size, batch.count)
                self.producers[batch.producer] = batch.base_seq + batch.count
                expected = batch.next_offset
                position += batch.size
        if position < end:
            dropped = _written_past(seg.path, position, end, seg.base_offset, expected)
            os.ftruncate(seg.fd, position)
            os.fsync(seg.fd)
            self.recovered_dropped_bytes = dropped
            if dropped:
                log.warning("Log %s: dropped a torn or corrupt tail of %d bytes at offset %d; offsets continue from %d", seg.path, dropped, expected, expected)
        seg.size = position
        seg.next_offset = expected
        seg.rewrite_index()
        log.info("Log %s: %d segments, offsets %d..%d", self.directory, len(self.segments) + 1, self.first_offset, self.next_offset)

    # -- appending -----------------------------------------------------------------------------

    @property
    def next_offset(self) -> int:
        return self.active.next_offset

    @property
    def first_offset(self) -> int:
        return self.segments[0] if self.segments else self.active.base_offset

    def written(self, base: int) -> int | None:
        """How far the segment at `base` is written, if it is the active one (None for a closed
        one: it was trimmed to its end). Safe from a reader's thread: one read of `active`."""
        active = self.active
        return active.size if active is not None and active.base_offset == base else None

    def append(self, producer: bytes, base_seq: int, count: int, payload: bytes, received_ns: int) -> int:
        """Write one batch with one write call; returns its base offset. Raises LogUnavailable."""
        seg = self.active
        size = HEADER_SIZE + len(payload)
        try:
            if seg.size and seg.size + size > self.segment_bytes:
                seg = self._roll()
            base = seg.next_offset
            header = encode_batch(base, producer, base_seq, received_ns, count, payload)
            written = os.pwritev(seg.fd, [header, payload], seg.size)  # at our own end: a torn attempt is overwritten by the retry
            if written != size:
                raise OSError(f"short write ({written} of {size} bytes)")
            entry = seg.note_batch(base, seg.size, size, count)
            if entry:
                os.write(seg.index_fd, entry)
        except OSError as exc:
            if self.error is None:
                log.error("Log %s: write failed (%s); acknowledgments stop until writes succeed", self.directory, exc.strerror or exc)
            self.error = exc.strerror or str(exc)
            raise LogUnavailable(self.error) from None
        if self.error is not None:
            log.info("Log %s: writes succeed again", self.directory)
            self.error = None
        self.dirty = True
        return base

    def _roll(self) -> Segment:
        """Close the active segment and start the next; if any step fails, the old one stays
        active and whole, and the next append tries again."""
        old = self.active
        if self.fsync == "always":  # before the burst's acknowledgments, which sync only the new segment
            os.fsync(old.fd)
        os.ftruncate(old.fd, old.size)  # drop the remains of a torn write past the end, if any
        seg = Segment(self.directory, old.next_offset)
        self._take_recycled(seg.path)
        seg.open()
        if self.fsync == "interval":  # its tail is synced off the event loop (an fsync of up to a segment takes tens of ms)
            self._later(lambda: self._sync_and_close(old))
        else:
            old.close()
        self.segments.append(old.base_offset)
        self.sizes[old.base_offset] = old.size
        self.active = seg
        self.enforce_retention()
        return seg

    def _take_recycled(self, path: str) -> None:
        """Let the segment about to start at `path` overwrite the recycled file, if there is one
        (its remains past what the segment writes are told apart by offset, see the docstring)."""
        if self.retention_age_s is not None:
            return
        recycled = os.path.join(self.directory, RECYCLED_NAME)
        try:
            if not stat.S_ISREG(os.lstat(recycled).st_mode):  # planted: never written through, never renamed into the log
                log.warning("Log %s: %s is not a plain file; segments start in new files", self.directory, RECYCLED_NAME)
                return
            os.rename(recycled, path)
        except FileNotFoundError:
            pass  # none yet, or the retired segment is still being renamed: a new file, as before
        except OSError as exc:
            log.warning("Log %s: cannot reuse the recycled segment file: %s", self.directory, exc.strerror)

    def _sync_and_close(self, segment: Segment) -> None:
        try:
            os.fsync(segment.fd)
        except OSError as exc:
            log.error("Log %s: fsync of segment %d failed: %s", self.directory, segment.base_offset, exc.strerror)
        finally:
            segment.close()

    def _later(self, work: Callable[[], None]) -> None:
        if self.background is None:
            work()
        else:
            self.background(work)

    def sync_due(self) -> bool:
        """Whether the fsync policy wants an fsync before the next acknowledgments go out."""
        if not self.dirty or self.fsync == "never":
            return False
        return self.fsync == "always" or time.monotonic() - self.last_fsync >= self.fsync_interval_s

    def sync(self) -> None:
        """fsync the active segment. Raises LogUnavailable."""
        try:
            os.fdatasync(self.active.fd)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            raise LogUnavailable(self.error) from None
        self.dirty = False
        self.last_fsync = time.monotonic()

    # -- retention -----------------------------------------------------------------------------

    def enforce_retention(self) -> None:
        """Delete whole old segments beyond --retention-bytes or older than --retention-age."""
        now = time.time()
        while self.segments:
            base = self.segments[0]
            total = sum(self.sizes.values()) + self.active.size
            path = os.path.join(self.directory, segment_name(base) + SEGMENT_SUFFIX)
            too_big = total > self.retention_bytes
            try:
                too_old = self.retention_age_s is not None and now - os.stat(path).st_mtime > self.retention_age_s
            except FileNotFoundError:
                too_old = True
            if not (too_big or too_old):
                break
            self._later(lambda base=base: self._retire(base))  # renaming is quick; unlinking 64 MiB takes milliseconds
            self.segments.pop(0)
            self.sizes.pop(base, None)
            log.info("Log %s: deleted segment %d (%s)", self.directory, base, "retention bytes" if too_big else "retention age")

    def _retire(self, base: int) -> None:
        """Remove a segment from the log: its index is deleted, its file becomes the recycled
        one (replacing an older recycled file, if the next segment has not taken that yet).
        With --retention-age the file is deleted instead: no record may outlive the age on disk,
        and a recycled file's remains could."""
        stem = os.path.join(self.directory, segment_name(base))
        if self.retention_age_s is None:
            self._quietly(base, os.rename, stem + SEGMENT_SUFFIX, os.path.join(self.directory, RECYCLED_NAME))
        else:
            self._quietly(base, os.unlink, stem + SEGMENT_SUFFIX)
        self._quietly(base, os.unlink, stem + INDEX_SUFFIX)

    def _quietly(self, base: int, step: Callable, *paths: str) -> None:
        try:
            step(*paths)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("Log %s: cannot retire segment %d: %s", self.directory, base, exc.strerror)

    # -- stats and close -----------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "directory": self.directory,
            "segments": len(self.segments) + 1,
            "bytes": sum(self.sizes.values()) + self.active.size,
            "first_offset": self.first_offset,
            "last_offset": self.next_offset - 1,
            "fsync": self.fsync,
            "since_last_fsync_s": round(time.monotonic() - self.last_fsync, 3),
            "recovery_dropped_bytes": self.recovered_dropped_bytes,
            "healthy": self.error is None,
            "error": self.error,
        }

    def close(self) -> None:
        if self.active is not None:
            try:
                os.ftruncate(self.active.fd, self.active.size)  # a recycled file's remains go
                os.fsync(self.active.fd)
            except OSError as exc:
                log.error("Log %s: final fsync failed: %s", self.directory, exc.strerror)
            self.active.close()
            self.active = None


# -- reading ---------------------------------------------------------------------------------------


def scan(f, path: str, *, start: int = 0, verify: bool = True, end: int | None = None) -> Iterator[Batch]:
    """Valid batches of an open segment from `start` (to `end`, if the writer's end is known), in
    order; damage is reported and skipped.

    A damaged batch is skipped by resynchronising on the next position where a valid batch
    begins. The end of a segment that is still being written may be torn: it ends the scan
    quietly when nothing valid follows it. So does what is not this segment's: a recycled
    file's remains (offsets below the segment's base), or, when the file was recycled while
    being read, the next segment's batches (offsets not following on).
    """
    floor = segment_base(path) or 0
    expected = floor if start == 0 else None  # from an index entry: its batch comes first
    position = start
    end = f.seek(0, os.SEEK_END) if end is None else min(end, f.seek(0, os.SEEK_END))
    while position < end:
        batch = read_batch(f, position, verify=verify)
        if batch is not None:
            if batch.base_offset < floor or (expected is not None and batch.base_offset != expected):
                return
            yield batch
            expected = batch.next_offset
            position += batch.size
            continue
        resumed = _resync(f, position + 1, end)
        if resumed is None or resumed.base_offset < max(floor, expected or 0) or not _still_at(f, path):
            return  # a torn or damaged tail, or what follows is not this segment's
        expected = resumed.base_offset
        log.warning(
            "Log %s: damaged batch at byte %d skipped (%d bytes); reading resumes at offset %d",
            path,
            position,
            resumed.position - position,
            resumed.base_offset,
        )
        position = resumed.position


def _still_at(f, path: str) -> bool:
    """Whether the open file is still the one at `path` (retention has not recycled it)."""
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except OSError:
        return False


def _written_past(path: str, position: int, end: int, base: int, expected: int) -> int:
    """Bytes from `position` (where the valid batches of the segment at `path` end, the next
    offset being `expected`) that this segment wrote: a torn batch. Not counted: a recycled
    file's remains after it, which begin anywhere inside one of the older segment's batches."""
    with open_read(path) as f:
        batch = read_batch(f, position)
        if batch is not None and batch.base_offset < base:
            return 0  # the remains start right there
        remains = _resync(f, position + 1, end)
        if remains is None or remains.base_offset >= base:
            return end - position  # not a recycled file: everything past the valid end was ours
        f.seek(position)
        header = f.read(HEADER_SIZE)
        torn = len(header) == HEADER_SIZE and header[:4] in CHECKSUMS and HEADER.unpack(header)[3] == expected
        return remains.position - position if torn else 0


def _resync(f, position: int, end: int) -> Batch | None:
    """The next valid batch after `position`; always CRC-checked, so that payload bytes that
    happen to spell the magic are not taken for a header."""
    chunk_size = 1 << 20
    while position < end:
        f.seek(position)
        chunk = f.read(chunk_size + len(_MAGIC_PREFIX))
        at = chunk.find(_MAGIC_PREFIX)
        while at != -1:
            batch = read_batch(f, position + at)
            if batch is not None:
                return batch
            at = chunk.find(_MAGIC_PREFIX, at + 1)
        position += chunk_size
    return None


def read_batches(directory: str, from_offset: int = 0, from_time_ns: int | None = None, written: Callable[[int], int | None] | None = None) -> Iterator[Batch]:
    """Valid batches holding offsets >= `from_offset` (and received at or after `from_time_ns`,
    if given), in offset order. Constant memory: one batch at a time. Works while a broker is
    writing (reads to the last complete batch) and after one died (a torn tail ends the read).
    `written(base)`, from the writer, gives how far the segment at `base` is written (None: to
    its end), so that a reader in the broker never looks past it into a recycled file's remains.
    """
    bases = list_segments(directory)
    first = max(0, bisect.bisect_right(bases, from_offset) - 1)
    for base in bases[first:]:
        path = os.path.join(directory, segment_name(base) + SEGMENT_SUFFIX)
        try:
            f = open_read(path)
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        except OSError as exc:  # e.g. a symbolic link where a segment should be: refused
            log.warning("Log %s: cannot read %s: %s", directory, path, exc.strerror or exc)
            continue
        with f:
            if from_time_ns is not None and os.fstat(f.fileno()).st_mtime_ns < from_time_ns:
                continue  # its newest record is older than asked
            start = _index_position(os.path.join(directory, segment_name(base) + INDEX_SUFFIX), from_offset)
            for batch in scan(f, path, start=start, end=written(base) if written is not None else None):
                if batch.next_offset <= from_offset or (from_time_ns is not None and batch.received_ns < from_time_ns):
                    continue
                yield batch


def read_records(directory: str, from_offset: int = 0) -> Iterator[tuple[int, Batch, bytes]]:
    """(offset, batch, message) for every retained record from `from_offset`, in offset order."""
    for batch in read_batches(directory, from_offset):
        offset = batch.base_offset
        for message in batch.payload.split(b"\n"):
            if offset >= from_offset:
                yield offset, batch, message
            offset += 1


def _index_position(index_path: str, offset: int) -> int:
    """Where to start reading a segment for `offset`: the last indexed batch at or before it."""
    try:
        with open_read(index_path) as f:
            data = f.read()
    except OSError:  # absent, or not a plain file: read the segment from its start
        return 0
    entries = [INDEX_ENTRY.unpack_from(data, i) for i in range(0, len(data) - len(data) % INDEX_ENTRY.size, INDEX_ENTRY.size)]
    keys = [o for o, _ in entries]
    at = bisect.bisect_right(keys, offset) - 1
    return entries[at][1] if at >= 0 else 0
