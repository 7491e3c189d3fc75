"""Reading the CSV inputs, pass after pass, into encoded `fields` objects.

A *pass* reads every input (`--csv`, in order) from its header to its end. Each usable row
becomes the compact JSON bytes of its `fields` object (columns in its file's header order,
values typed by `streamer.infer`); the message envelope is added later, per message, by
`streamer.message`.

Work that does not change between passes is done once per file content: while a file's
identity (device, inode, size, modification time) is unchanged, a pass replays the rows encoded
by the first one instead of parsing again. Files whose encoded rows exceed the cache budget are
streamed on every pass instead, so memory stays bounded whatever the file's size. Inputs that
cannot be read again (standard input, a FIFO) make one pass; then the source is `finished`.

How bytes become text is `streamer.inputs` (compression, byte-order marks, --encoding); how
lines become rows is `streamer.csvreader` (delimiter, strict quoting). A row that cannot be used
is skipped and counted by reason (SKIP_REASONS); the first few of each pass are logged with
their line numbers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice

import orjson

from common.reports import SKIP_REASONS  # noqa: F401  (the one list of reasons; streamer.csvsource.SKIP_REASONS as before)

from .csvreader import SNIFF_LINES, Malformed, Reader, excel_sep, sniff
from .infer import BadValue, converters_for
from .inputs import STDIN, InputError, open_text, rereadable

log = logging.getLogger("streamer.csv")

MAX_FIELD_BYTES = 1 << 20  # a field longer than this (1 MiB, in UTF-8 bytes) makes its row unusable
CACHE_BYTES = 16 << 20  # encoded rows kept per worker between passes
_ROW_OVERHEAD = 48  # what one cached bytes object costs beyond its length (object + list slot)
_LOGGED_SKIPS_PER_PASS = 10

ENVELOPE_BYTES = 56  # what streamer.message adds around a row's fields: {"timestamp":"<30 chars>","fields":...}


def compact(encoded: bytes) -> bytes:
    """A copy of exactly its length. What orjson.dumps returns keeps the whole buffer it wrote
    into, for as long as it lives: 4 KiB for a 100-byte row in orjson 3.10+ (1 KiB in 3.8)."""
    return bytes(memoryview(encoded))


class CsvError(Exception):
    """An input cannot be streamed at all (missing, unreadable, empty, no data rows, bad header)."""


class NoUsableRows(CsvError):
    """A whole pass produced no usable row."""


@dataclass(frozen=True)
class CsvFormat:
    """How the inputs are read (the CSV options of the command line)."""

    delimiter: str | None = None  # None: auto
    encoding: str = "utf-8"
    skip_rows: int = 0
    comment: str | None = None
    null_values: tuple[str, ...] = ()


@dataclass
class Opened:
    """One input opened for a pass: its header, its rows, and how its delimiter was chosen."""

    header: list[str]
    rows: Iterator
    reader: Reader
    delimiter: str
    delimiter_from: str  # "option", "sep= line" or "sniffed"
    file: object

    def close(self) -> None:
        self.file.close()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _is_utf8(values: list[str]) -> bool:
    text = "".join(values)
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate: bytes that were not valid in the file's encoding
        return False
    return True


def open_csv(path: str, fmt: CsvFormat, *, max_field_bytes: int = MAX_FIELD_BYTES, stdin_fd: int | None = None, pipe: bool = False) -> Opened:
    """Open one input and read its header. Raises OSError, or CsvError with one reason."""
    shown = "standard input" if path == STDIN else path
    try:
        f = open_text(path, fmt.encoding, stdin_fd)
    except InputError as exc:
        raise CsvError(str(exc)) from None
    try:
        lines = iter(f)
        number = 1
        delimiter, source = fmt.delimiter, "option"
        first = next(lines, None)
        if first is not None and (sep := excel_sep(first)) is not None:
            if delimiter is None:
                delimiter, source = sep, "sep= line"
            number += 1
        elif first is not None:
            lines = chain((first,), lines)
        for _ in range(fmt.skip_rows):
            if next(lines, None) is None:
                break
            number += 1
        sample: list[str] = []
        if delimiter is None:
            # from a pipe only the header and the first row: a live one must not wait for 20 rows
            sample = list(islice(lines, 2 if pipe else SNIFF_LINES + 1))
            comment = fmt.comment
            delimiter, source = sniff([line for line in sample if not (comment and line.startswith(comment))]), "sniffed"
        reader = Reader(chain(sample, lines), delimiter, comment=fmt.comment, max_field_bytes=max_field_bytes, first_line=number)
        rows = iter(reader)
        header = next(rows, None)
        if header is None:
            raise CsvError(f"{shown}: file is empty")
        if isinstance(header, Malformed):
            raise CsvError(f"{shown}: malformed header on line {reader.line}: {header.detail}")
        if not _is_utf8(header):
            raise CsvError(f"{shown}: header is not valid {fmt.encoding.upper() if fmt.encoding.lower() != 'utf-8' else 'UTF-8'}")
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise CsvError(f"{shown}: duplicate column name {name!r} in header")
            seen.add(name)
        return Opened(header, rows, reader, delimiter, source, f)
    except (CsvError, UnicodeDecodeError):
        f.close()
        raise
    except OSError as exc:
        f.close()
        raise CsvError(f"{shown}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Checked:
    path: str
    header: list[str]
    delimiter: str
    delimiter_from: str


def check_csv(path: str, fmt: CsvFormat = CsvFormat()) -> Checked:
    """Validate one input before streaming it (header, a data line); raises CsvError with one reason.

    Only for inputs that can be read again: reading standard input or a FIFO here would lose it."""
    if os.path.isdir(path):
        raise CsvError(f"{path}: is a directory")
    try:
        opened = open_csv(path, fmt)
    except OSError as exc:
        raise CsvError(f"{path}: {exc.strerror or exc}") from None
    try:
        for _ in opened.rows:  # any line after the header, even one that will be skipped
            return Checked(path, opened.header, opened.delimiter, opened.delimiter_from)
    except OSError as exc:
        raise CsvError(f"{path}: {exc.strerror or exc}") from None
    finally:
        opened.close()
    raise CsvError(f"{path}: has a header but no data rows")


@dataclass
class _Pass:
    """One parse of one file content: what it produced and skipped."""

    identity: tuple[int, int, int, int] | None
    rows: list[bytes] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    cached_bytes: int = 0
    complete: bool = False


@dataclass
class _Input:
    """One input and what is remembered about it between passes."""

    path: str
    rereadable: bool
    cache: _Pass | None = None
    logged_identity: tuple | None = None
    too_large_identity: tuple | None = None


class CsvSource:
    """Endless source of encoded `fields` rows from the CSV inputs, one pass at a time."""

    def __init__(
        self,
        paths: str | list[str] | tuple[str, ...],
        column_types: dict[str, str],
        *,
        fmt: CsvFormat = CsvFormat(),
        cache_bytes: int = CACHE_BYTES,
        max_message_bytes: int | None = None,
        max_field_bytes: int = MAX_FIELD_BYTES,
        label: str = "",
        stdin_fd: int | None = None,
    ):
        paths = [paths] if isinstance(paths, str) else list(paths)
        self.inputs = [_Input(path, rereadable(path)) for path in paths]
        self.path = ", ".join(paths)
        # a row whose message would exceed the broker's cap is skipped here, not refused there
        self.max_fields_bytes = None if max_message_bytes is None else max_message_bytes - ENVELOPE_BYTES
        self.max_field_bytes = max_field_bytes
        self.column_types = column_types
        self.fmt = fmt
        self.cache_bytes = cache_bytes // max(1, len(paths))
        self.label = label or "Worker"
        self.stdin_fd = stdin_fd
        self.one_shot = not all(i.rereadable for i in self.inputs)  # read once: stdin, a FIFO
        self.finished = False  # a one-shot source has been read
        self.skipped: Counter = Counter()  # by reason, over every pass
        self.completed_passes = 0
        self._rows: Iterator[bytes] | None = None  # the pass being read
        self._rows_this_pass = 0
        self._pass_skipped: Counter = Counter()  # what the current pass skipped, by reason
        self._error: Exception | None = None  # raised by the next take(), after a partial batch

    def take(self, n: int) -> list[bytes]:
        """The next n rows, continuing into the next pass when one ends.

        The files are checked (stat) when a batch starts a new pass; a small file replayed several
        times within one batch is checked once for that batch. Raises OSError or CsvError
        (NoUsableRows for a pass without a usable row) when nothing can be read now; rows already
        taken are returned first and the error is raised by the next call. A one-shot source
        returns fewer than n rows at its end, then [] (`finished` is set).
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        batch: list[bytes] = []
        checked = False
        try:
            while len(batch) < n and not self.finished:
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
                    if self.one_shot:
                        self.finished = True
                    elif self._rows_this_pass == 0:
                        raise NoUsableRows(f"no usable row in {self.path} (skipped: {self.pass_skips()})")
        except (OSError, CsvError) as exc:
            self._rows = None
            if self.one_shot:  # what cannot be read again is not retried
                self.finished = True
            if not batch:
                raise
            self._error = exc
        return batch

    def pass_skips(self) -> str:
        """What the current (or last) pass skipped, by reason, for a log line."""
        counts = self._pass_skipped
        return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items())) or "nothing"

    def open_pass(self, check: bool = True) -> Iterator[bytes]:
        """Start the next pass. Raises OSError or CsvError when the first input cannot be read now.

        With check=False complete cached passes are replayed without looking at the files."""
        if self._pass_skipped:
            self._pass_skipped = Counter()
        if len(self.inputs) == 1:
            return self._input_pass(self.inputs[0], check)
        return chain.from_iterable(self._input_pass(i, check) for i in self.inputs)

    def _input_pass(self, item: _Input, check: bool) -> Iterator[bytes]:
        cache = item.cache
        if not item.rereadable:
            return self._parse(item, None)
        if not check and cache is not None and cache.complete:
            identity = cache.identity
        else:
            identity = _identity(os.stat(item.path))
        if cache is not None and cache.identity == identity and cache.complete:
            if cache.skipped:
                self.skipped.update(cache.skipped)
                self._pass_skipped.update(cache.skipped)
            return iter(cache.rows)
        item.cache = None
        return self._parse(item, identity)

    def _parse(self, item: _Input, identity: tuple[int, int, int, int] | None) -> Iterator[bytes]:
        """Parse one input once, yielding encoded rows; keeps them for replay if they fit the budget."""
        path = item.path
        log_skips = identity is None or identity != item.logged_identity
        item.logged_identity = identity
        keep = identity is not None and identity != item.too_large_identity
        current = _Pass(identity)
        logged = 0
        shown = "standard input" if path == STDIN else path
        opened = open_csv(path, self.fmt, max_field_bytes=self.max_field_bytes, stdin_fd=self.stdin_fd, pipe=not item.rereadable)
        try:
            header = opened.header
            converters = converters_for(header, self.column_types, self.fmt.null_values)
            width = len(header)
            reader = opened.reader
            max_fields_bytes = self.max_fields_bytes
            for row in opened.rows:
                if row.__class__ is Malformed:
                    reason, detail = row.reason, row.detail
                elif len(row) != width:
                    reason, detail = "field_count", f"{len(row)} fields, header has {width}"
                elif not _is_utf8(row):
                    reason, detail = "invalid_utf8", "bytes that are not valid text"
                else:
                    try:
                        encoded = orjson.dumps(dict(zip(header, [conv(v) for conv, v in zip(converters, row)])))
                    except BadValue as exc:
                        reason, detail = "bad_value", str(exc)
                    else:
                        if max_fields_bytes is None or len(encoded) <= max_fields_bytes:
                            if keep:
                                encoded = compact(encoded)  # kept as long as the worker lives
                                current.rows.append(encoded)
                                current.cached_bytes += len(encoded) + _ROW_OVERHEAD
                                if current.cached_bytes > self.cache_bytes:
                                    keep = False
                                    item.too_large_identity = identity
                                    current.rows = []
                            yield encoded
                            continue
                        reason, detail = "message_too_large", f"{len(encoded) + ENVELOPE_BYTES} bytes, over --max-message-bytes"
                current.skipped[reason] += 1
                self.skipped[reason] += 1
                self._pass_skipped[reason] += 1
                if log_skips:
                    if logged < _LOGGED_SKIPS_PER_PASS:
                        log.warning("%s: skipped line %d of %s (%s: %s)", self.label, reader.line, shown, reason, detail)
                    elif logged == _LOGGED_SKIPS_PER_PASS:
                        log.warning("%s: more rows skipped in %s; counts are in the stats", self.label, shown)
                    logged += 1
        finally:
            opened.close()
        if identity is None:
            return
        try:
            unchanged = _identity(os.stat(path)) == identity
        except OSError:
            unchanged = False
        if keep and unchanged:  # a file edited mid-pass is parsed again next time
            current.complete = True
            item.cache = current
