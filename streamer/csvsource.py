"""Reading a CSV file, pass after pass, into encoded `fields` objects.

A *pass* reads the file from its header to its end. Each usable row becomes the compact JSON
bytes of its `fields` object (columns in header order, values typed by `streamer.infer`); the
message envelope is added later, per message, by `streamer.message`.

Work that does not change between passes is done once per file content: while the file's
identity (device, inode, size, modification time) is unchanged, a pass replays the rows encoded
by the first one instead of parsing again. Files whose encoded rows exceed the cache budget are
streamed on every pass instead, so memory stays bounded whatever the file's size.

Format: UTF-8 (a leading byte-order mark is dropped), comma delimiter, `\\n` or `\\r\\n` line
endings, RFC 4180 quoting (quoted commas, quotes and newlines). A row that cannot be used is
skipped and counted by reason (SKIP_REASONS); the first few of each pass are logged with their
line numbers.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import orjson

from common.reports import SKIP_REASONS  # noqa: F401  (the one list of reasons; streamer.csvsource.SKIP_REASONS as before)

from .infer import BadValue, converters_for

log = logging.getLogger("streamer.csv")

MAX_FIELD_CHARS = 1 << 20  # a field longer than this (1 MiB) makes its row unusable
CACHE_BYTES = 16 << 20  # encoded rows kept per worker between passes
_ROW_OVERHEAD = 48  # what one cached bytes object costs beyond its length (object + list slot)
_LOGGED_SKIPS_PER_PASS = 10

ENVELOPE_BYTES = 56  # what streamer.message adds around a row's fields: {"timestamp":"<30 chars>","fields":...}

csv.field_size_limit(MAX_FIELD_CHARS)


class CsvError(Exception):
    """The file cannot be streamed at all (missing, unreadable, empty, no data rows, bad header)."""


class NoUsableRows(CsvError):
    """A whole pass produced no usable row."""


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open(path: str):
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _is_utf8(values: list[str]) -> bool:
    text = "".join(values)
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate: bytes that were not UTF-8 in the file
        return False
    return True


def _check_header(path: str, header: list[str] | None) -> list[str]:
    if not header:
        raise CsvError(f"{path}: file is empty")
    if not _is_utf8(header):
        raise CsvError(f"{path}: header is not valid UTF-8")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise CsvError(f"{path}: duplicate column name {name!r} in header")
        seen.add(name)
    return header


def check_csv(path: str) -> list[str]:
    """Validate a file before streaming it; returns its header or raises CsvError with one reason."""
    if os.path.isdir(path):
        raise CsvError(f"{path}: is a directory")
    try:
        with _open(path) as f:
            reader = csv.reader(f)
            header = _check_header(path, next(reader, None))
            for row in reader:
                if row:
                    return header
    except OSError as exc:
        raise CsvError(f"{path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise CsvError(f"{path}: malformed CSV: {exc}") from None
    raise CsvError(f"{path}: has a header but no data rows")


@dataclass
class _Pass:
    """One parse of one file content: what it produced and skipped."""

    identity: tuple[int, int, int, int]
    rows: list[bytes] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    cached_bytes: int = 0
    complete: bool = False


class CsvSource:
    """Endless source of encoded `fields` rows from one CSV path, one pass at a time."""

    def __init__(self, path: str, column_types: dict[str, str], *, cache_bytes: int = CACHE_BYTES, max_message_bytes: int | None = None, label: str = ""):
        self.path = path
        # a row whose message would exceed the broker's cap is skipped here, not refused there
        self.max_fields_bytes = None if max_message_bytes is None else max_message_bytes - ENVELOPE_BYTES
        self.column_types = column_types
        self.cache_bytes = cache_bytes
        self.label = label or "Worker"
        self.skipped: Counter = Counter()  # by reason, over every pass
        self.completed_passes = 0
        self._cache: _Pass | None = None
        self._rows: Iterator[bytes] | None = None  # the pass being read
        self._rows_this_pass = 0
        self._error: Exception | None = None  # raised by the next take(), after a partial batch
        self._logged_identity: tuple | None = None
        self._too_large_identity: tuple | None = None

    def take(self, n: int) -> list[bytes]:
        """The next n rows, continuing into the next pass when one ends.

        The file is checked (stat) when a batch starts a new pass; a small file replayed several
        times within one batch is checked once for that batch. Raises OSError or CsvError
        (NoUsableRows for a pass without a usable row) when nothing can be read now; rows already
        taken are returned first and the error is raised by the next call.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        batch: list[bytes] = []
        checked = False
        try:
            while len(batch) < n:
                if self._rows is None:
                    self._rows = self.open_pass(check=not checked)
                    checked = True
                    self._rows_this_pass = 0
                before = len(batch)
                batch.extend(islice(self._rows, n - before))
                self._rows_this_pass += len(batch) - before
                if len(batch) < n:  # the pass ended
                    self._rows = None
                    self.completed_passes += 1
                    if self._rows_this_pass == 0:
                        raise NoUsableRows(f"{self.path}: no usable rows")
        except (OSError, CsvError) as exc:
            self._rows = None
            if not batch:
                raise
            self._error = exc
        return batch

    def open_pass(self, check: bool = True) -> Iterator[bytes]:
        """Start the next pass. Raises OSError or CsvError when the file cannot be read now.

        With check=False a complete cached pass is replayed without looking at the file.
        """
        cache = self._cache
        if not check and cache is not None and cache.complete:
            identity = cache.identity
        else:
            identity = _identity(os.stat(self.path))
        if cache is not None and cache.identity == identity and cache.complete:
            self.skipped.update(cache.skipped)
            return iter(cache.rows)
        self._cache = None
        return self._parse(identity)

    def _parse(self, identity: tuple[int, int, int, int]) -> Iterator[bytes]:
        """Parse the file once, yielding encoded rows; keeps them for replay if they fit the budget."""
        log_skips = identity != self._logged_identity
        self._logged_identity = identity
        keep = identity != self._too_large_identity
        current = _Pass(identity)
        logged = 0
        with _open(self.path) as f:
            reader = csv.reader(f)
            try:
                header = _check_header(self.path, next(reader, None))
            except csv.Error as exc:
                raise CsvError(f"{self.path}: malformed header: {exc}") from None
            converters = converters_for(header, self.column_types)
            width = len(header)
            last_line = reader.line_num
            while True:
                reason = None
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    reason = "field_too_large" if "field limit" in str(exc) else "malformed"
                    detail = str(exc)
                else:
                    if not row:  # blank line
                        last_line = reader.line_num
                        continue
                    if len(row) != width:
                        reason, detail = "field_count", f"{len(row)} fields, header has {width}"
                    elif not _is_utf8(row):
                        reason, detail = "invalid_utf8", "bytes that are not UTF-8"
                    else:
                        try:
                            encoded = orjson.dumps(dict(zip(header, [conv(v) for conv, v in zip(converters, row)])))
                        except BadValue as exc:
                            reason, detail = "bad_value", str(exc)
                        else:
                            if self.max_fields_bytes is not None and len(encoded) > self.max_fields_bytes:
                                reason, detail = "message_too_large", f"{len(encoded) + ENVELOPE_BYTES} bytes, over --max-message-bytes"
                if reason is None:
                    last_line = reader.line_num
                    if keep:
                        current.rows.append(encoded)
                        current.cached_bytes += len(encoded) + _ROW_OVERHEAD
                        if current.cached_bytes > self.cache_bytes:
                            keep = False
                            self._too_large_identity = identity
                            current.rows = []
                    yield encoded
                    continue
                current.skipped[reason] += 1
                self.skipped[reason] += 1
                if log_skips:
                    if logged < _LOGGED_SKIPS_PER_PASS:
                        log.warning("%s: skipped line %d of %s (%s: %s)", self.label, last_line + 1, self.path, reason, detail)
                    elif logged == _LOGGED_SKIPS_PER_PASS:
                        log.warning("%s: more rows skipped in %s; counts are in the stats", self.label, self.path)
                    logged += 1
                last_line = reader.line_num
        try:
            unchanged = _identity(os.stat(self.path)) == identity
        except OSError:
            unchanged = False
        if keep and unchanged:  # a file edited mid-pass is parsed again next time
            current.complete = True
            self._cache = current
