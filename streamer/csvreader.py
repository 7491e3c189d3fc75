"""Lines of CSV text into rows of fields: the dialect (delimiter, spaces, comments) and strict quoting.

Dialect, per file (`sniff`):
    --delimiter auto   an Excel `sep=X` first line names it (and is not the header); otherwise the
                       candidate among , ; TAB | that splits the header and the first rows into the
                       same number of fields (more than one) wins; none does: ','
    spaces             after a delimiter they are dropped (nvidia-smi writes ", "), unless the
                       delimiter is itself a space
    --skip-rows N      lines before the header that are not CSV (a preamble)
    --comment C        a line starting with C is skipped (outside quoted fields)

Strict quoting (RFC 4180): a field is either quoted, "...", with "" for a quote inside and
delimiters and line breaks allowed, or unquoted without any quote. A row breaking that rule is
`malformed` and costs only itself:
    a"b          a quote inside an unquoted field         that line
    "a"b         text after the closing quote             that line (or the lines the field spans)
    "a...        a quote never closed (before the end or  the line where it opened: reading
                 the size limit)                          resumes on the next line

The hot path: a line without a quote is split with str.split; a line with quotes that is a
complete, well-formed record (one C regex match) is split by the csv module; only lines that
fail that check (multi-line fields, damage) take the slow path here.
"""

from __future__ import annotations

import csv
import re
from collections import deque
from collections.abc import Iterator

CANDIDATES = (",", ";", "\t", "|")
NAMES = {"tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
SNIFF_LINES = 20
_SEP_LINE = re.compile(r"sep=(.)\r?\n?", re.IGNORECASE | re.DOTALL)


class Malformed:
    """A row the reader could not split (one object per bad row; the slow path only)."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


def parse_delimiter(text: str) -> str | None:
    """`auto` -> None; tab/comma/semicolon/pipe/space or one character -> that character."""
    lowered = text.strip().lower() if text.strip() else text
    if lowered == "auto":
        return None
    if lowered in NAMES:
        return NAMES[lowered]
    if text == "\\t":
        return "\t"
    if len(text) != 1 or text in '"\r\n':
        raise ValueError(f"{text!r} is not auto, tab or one character other than a quote or line break")
    return text


def excel_sep(first_line: str) -> str | None:
    """The delimiter an Excel `sep=X` first line names, or None."""
    match = _SEP_LINE.fullmatch(first_line.lstrip("\ufeff"))
    return match.group(1) if match and match.group(1) not in '"\r\n' else None


def sniff(lines: list[str]) -> str:
    """The delimiter that splits the header and the first rows alike (see the module docstring)."""
    samples = [_QUOTED.sub("", line) for line in lines[:SNIFF_LINES] if line.strip()]
    if not samples:
        return ","
    best, best_score = ",", (0, 0)
    for candidate in CANDIDATES:
        header = samples[0].count(candidate)
        if header == 0:
            continue
        same = sum(1 for line in samples[1:] if line.count(candidate) == header)
        score = (same, header)
        if score > best_score:
            best, best_score = candidate, score
    return best


_QUOTED = re.compile(r'"(?:[^"]|"")*"?')


class Reader:
    """Rows of one file's lines (each with its line ending), strictly quoted.

    Iterating yields a list of fields per row, or a Malformed for a row that cannot be split;
    blank and comment lines yield nothing. `line` is the number of the first line of the last
    row yielded (the first line given is `first_line`).
    """

    def __init__(self, lines, delimiter: str = ",", *, comment: str | None = None, max_field_bytes: int = 1 << 20, first_line: int = 1):
        self._lines = iter(lines)
        self.delimiter = delimiter
        self.strip = delimiter != " "
        self.comment = comment or None
        self.max_field_bytes = max_field_bytes
        self.line = first_line - 1
        self._next_line = first_line
        d = re.escape(delimiter)
        space = " *+" if self.strip else ""
        field = rf'{space}(?:"[^"]*+(?:""[^"]*+)*+"|[^"{d}\r\n]*+)'  # unrolled: ~500 MB/s on DCGM exports
        self._record = re.compile(rf"{field}(?:{d}{field})*+\r?\n?")
        self._quoted = re.compile(rf'{space}"((?:[^"]++|"")*+)"')
        self._plain = re.compile(rf'[^"{d}]*+')
        self._dialect = type(
            "Strict",
            (csv.Dialect,),
            {
                "delimiter": delimiter,
                "quotechar": '"',
                "doublequote": True,
                "skipinitialspace": self.strip,
                "lineterminator": "\n",
                "quoting": csv.QUOTE_MINIMAL,
                "strict": True,
            },
        )
        csv.field_size_limit(max(csv.field_size_limit(), max_field_bytes + 1))
        self._feed: list[str] = []
        self._csv = self._new_csv()

    def _new_csv(self):
        """One csv reader for the whole file, fed a line at a time (a reader per line costs 3 us)."""
        return csv.reader(iter(self._feed.pop, None), self._dialect)

    def __iter__(self) -> Iterator[list[str] | Malformed]:
        d, strip, comment, record = self.delimiter, self.strip, self.comment, self._record.fullmatch
        feed, parse = self._feed.append, self._csv.__next__
        long_line = self.max_field_bytes >> 2  # a field this many characters long may be over the limit in bytes
        number = self._next_line - 1
        source = self._lines
        pending: deque[str] | None = None
        while True:
            for line in source:
                number += 1
                if '"' not in line:
                    text = line.rstrip("\r\n")
                    if not text or (comment is not None and text.startswith(comment)):
                        continue
                    row = text.split(d)
                    if strip and " " in text:
                        row = [v.lstrip(" ") for v in row]
                else:
                    if comment is not None and line.startswith(comment):
                        continue
                    # the csv module splits it, strictly: text after a closing quote raises, a quote
                    # left open asks for the next line (IndexError: none is fed)
                    feed(line)
                    try:
                        row = parse()
                    except (csv.Error, IndexError):
                        self._feed.clear()
                        row = None
                    if row is not None:
                        # csv keeps a quote inside an unquoted field (a"b): with q quotes in the
                        # values, a line of n fields all quoted has exactly 2(n + q); q == 0 rules
                        # it out too. Other lines with quoted quotes get the full regex check.
                        q = "".join(row).count('"')
                        if q and line.count('"') != 2 * (len(row) + q) and record(line) is None:
                            row = None
                    if row is None:
                        text = line.rstrip("\r\n")
                        if not text:
                            continue
                        first = number
                        row, extra, number = self._slow(line, text, source, number)
                        self.line = first
                        if extra:  # an unclosed quote: the lines after the one where it opened are read again
                            number = first
                            if pending is None:
                                pending = deque(extra)
                                source = _replay(pending, source)
                                yield row
                                break
                            pending.extendleft(reversed(extra))
                        yield row
                        continue
                    text = line
                self.line = number
                if len(text) > long_line and row.__class__ is list:
                    row = self._check_size(row)
                yield row
            else:
                self._next_line = number + 1
                return

    def _check_size(self, row: list[str]) -> list[str] | Malformed:
        limit = self.max_field_bytes
        for value in row:
            if len(value) > limit >> 2 and len(value.encode("utf-8", "surrogateescape")) > limit:
                return Malformed("field_too_large", f"a field over {limit} bytes")
        return row

    def _slow(self, line: str, text: str, source, number: int):
        """A line with quotes that is not one complete well-formed record. Returns (row or
        Malformed, lines to read again, number of the last line consumed)."""
        result = self._split(text)
        if result.__class__ is not _Open:
            return self._sized(result), None, number
        # a quoted field goes on past this line: gather lines until one closes it, then split
        # from that field's opening quote on (the fields before it are kept), so a record of
        # many lines costs time in proportion to its length
        limit = self.max_field_bytes
        fields, parts, at, extra = result.fields, [line], result.at, []
        size = _bytes(line)
        while True:
            nxt = next(source, None)
            if nxt is None:
                return Malformed("malformed", "a quote that is never closed"), extra, number + len(extra)
            extra.append(nxt)
            parts.append(nxt)
            size += _bytes(nxt)
            if size > limit:
                return Malformed("malformed", f"a quote not closed within {limit} bytes"), extra, number + len(extra)
            if '"' not in nxt or _CLOSING.match(nxt) is None:
                continue  # still inside the quoted field
            raw = "".join(parts)
            result = self._split(raw.rstrip("\r\n"), at)
            if result.__class__ is list:
                return self._sized(fields + result), None, number + len(extra)
            if result.__class__ is not _Open:
                # closed, but broken after: the row that opened it is lost, not the lines that follow
                reason = "a quoted field that spans lines and is broken after its closing quote"
                return Malformed("malformed", reason), extra, number + len(extra)
            fields = fields + result.fields  # another quoted field opened and goes on
            parts, at = [raw[result.at :]], 0

    def _sized(self, result):
        if isinstance(result, list) and sum(map(len, result)) > self.max_field_bytes >> 2:
            return self._check_size(result)
        return result

    def _split(self, text: str, pos: int = 0):
        """Fields of one logical record (from `pos`, a field's start), a Malformed, or an _Open
        when a quoted field is not closed within the text."""
        d, strip, quoted, plain = self.delimiter, self.strip, self._quoted.match, self._plain.match
        fields: list[str] = []
        end = len(text)
        while True:
            match = quoted(text, pos)
            if match is not None:
                fields.append(match.group(1).replace('""', '"'))
                pos = match.end()
            else:
                match = plain(text, pos)
                value, pos = match.group(), match.end()
                if pos < end and text[pos] == '"':
                    if not (value.strip(" ") if strip else value):
                        return _Open(fields, pos)
                    return Malformed("malformed", "a quote inside an unquoted field")
                fields.append(value.lstrip(" ") if strip else value)
            if pos == end:
                return fields
            if text[pos] == d:
                pos += 1
                continue
            return Malformed("malformed", "text after a closing quote")


class _Open:
    """A quoted field not closed within the text: the fields before it, and where its quote is."""

    __slots__ = ("fields", "at")

    def __init__(self, fields: list[str], at: int):
        self.fields = fields
        self.at = at


# inside a quoted field: does this line close it? ("" is a quote within it; a lone " closes it)
_CLOSING = re.compile(r'(?:[^"]|"")*+"(?!")')


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


class _replay:
    """Lines to read again first (after an unclosed quote), then the rest; unlike a generator it
    can go on after reporting its end, when more lines are put back."""

    __slots__ = ("pending", "lines")

    def __init__(self, pending: deque, lines):
        self.pending = pending
        self.lines = lines

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pending:
            return self.pending.popleft()
        return next(self.lines)
