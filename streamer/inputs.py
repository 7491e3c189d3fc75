"""Where CSV text comes from: which files `--csv` names, and how one of them is opened as text.

    --csv a.csv --csv 'logs/*.csv' --csv exports/     each file once, in this order; a glob or a
                                                      directory (its *.csv) expands sorted
    --csv -   (or /dev/stdin)                         standard input, read once
    a FIFO, a character device, a socket              read once (it cannot be read again)

Opening one input, in layers, without a temporary copy:

    bytes          the file, or standard input (a file descriptor handed to the worker)
    decompressed   gzip 1f 8b, bzip2 "BZh", xz fd "7zXZ" 00, zstd 28 b5 2f fd: by the first bytes
    text           a byte-order mark picks UTF-8/16/32 and is dropped; otherwise --encoding
                   (default utf-8). Bytes that are not valid in the encoding are kept as
                   surrogates (the row is skipped as invalid_utf8, not the file refused)
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import lzma
import os
import stat

STDIN = "-"
_STDIN_ALIASES = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})
_BUFFER = 1 << 20  # large reads: the layers above cost per read, not per byte
_HEAD = 4096  # bytes looked at for a byte-order mark and for UTF-16 without one
_HEAD_MIN = 4  # ...at least this many (the longest byte-order mark), unless the input is shorter

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_BOMS = (  # longest first: the UTF-32-LE mark starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class InputError(Exception):
    """An input that cannot be read as CSV text at all (with the reason, for one line)."""


def expand(specs: list[str] | tuple[str, ...]) -> list[str]:
    """The files `--csv` values name, in order: globs and directories expand to sorted paths."""
    paths: list[str] = []
    for spec in specs:
        if spec in _STDIN_ALIASES:
            paths.append(STDIN)
        elif os.path.isdir(spec):
            found = sorted(p for p in glob.glob(os.path.join(glob.escape(spec), "*.csv")) if not os.path.isdir(p))
            if not found:
                raise InputError(f"{spec}: is a directory with no *.csv files")
            paths.extend(found)
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(p for p in glob.glob(spec) if not os.path.isdir(p))
            if not found:
                raise InputError(f"{spec}: no file matches")
            paths.extend(found)
        else:
            paths.append(spec)
    return paths


def rereadable(path: str) -> bool:
    """False for standard input, FIFOs, sockets and devices: they are read once."""
    if path == STDIN:
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # a missing file may appear later: the worker waits for it
    return stat.S_ISREG(mode)


def check_encoding(name: str) -> str:
    """The codec's canonical name; raises LookupError for an unknown encoding."""
    return codecs.lookup(name).name


def open_binary(path: str, stdin_fd: int | None = None) -> io.BufferedIOBase:
    if path == STDIN:
        if stdin_fd is None:
            raise InputError("standard input is not available to this process")
        return open(stdin_fd, "rb", buffering=_BUFFER, closefd=False)
    return open(path, "rb", buffering=_BUFFER)


def open_text(path: str, encoding: str = "utf-8", stdin_fd: int | None = None) -> io.TextIOWrapper:
    """Open one input as text (see the module docstring). Raises OSError or InputError."""
    raw = open_binary(path, stdin_fd)
    try:
        data = _decompressed(raw, path)
        head = _read_head(data)
        encoding = _encoding(head, encoding, path)
        if data is raw and raw.seekable():  # a plain file: back to its start, no layer between
            raw.seek(0)
            stream = raw
        else:
            stream = io.BufferedReader(_Replay(head, data, raw), _BUFFER)
        return io.TextIOWrapper(stream, encoding=encoding, errors="surrogateescape", newline="")
    except BaseException:
        raw.close()
        raise


def _decompressed(raw: io.BufferedReader, path: str):
    magic = raw.peek(8)[:8]
    for prefix, kind in _MAGIC:
        if magic.startswith(prefix):
            try:
                if kind == "gzip":
                    return gzip.GzipFile(fileobj=raw, mode="rb")
                if kind == "bzip2":
                    return bz2.BZ2File(raw, "rb")
                if kind == "xz":
                    return lzma.LZMAFile(raw, "rb")
                import zstandard

                return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise InputError(f"{path}: cannot decompress {kind}: {exc}") from None
    return raw


def _read_head(data) -> bytes:
    """Up to _HEAD bytes, but from a pipe only what has arrived once there are a few (a live
    `nvidia-smi -l 1 | ...` must not wait for 4 KiB)."""
    read = getattr(data, "read1", data.read)
    chunks, size = [], 0
    while size < _HEAD_MIN:
        try:
            chunk = read(_HEAD - size)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise InputError(f"cannot decompress: {exc}") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _encoding(head: bytes, encoding: str, path: str) -> str:
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    canonical = codecs.lookup(encoding).name
    if canonical == "utf-8":
        canonical = "utf-8-sig"
    if not canonical.startswith(("utf-16", "utf-32")) and _looks_like_utf16(head):
        raise InputError(
            f"{'standard input' if path == STDIN else path}: looks like UTF-16 without a byte-order mark: give --encoding=utf-16-le (or utf-16-be)"
        )
    return canonical


def _looks_like_utf16(head: bytes) -> bool:
    """ASCII text in UTF-16 has a zero byte in every other position."""
    sample = head[:512]
    if len(sample) < 4:
        return False
    even, odd = sample[0::2], sample[1::2]
    return even.count(0) >= len(even) * 0.4 or odd.count(0) >= len(odd) * 0.4


class _Replay(io.RawIOBase):
    """The bytes already read (head), then the rest of the stream: no seeking needed, so pipes and
    decompressors work the same as files."""

    def __init__(self, head: bytes, rest, raw):
        self._head = memoryview(head)
        self._rest = rest
        self._raw = raw  # the file under a decompressor, closed with it

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        try:  # what is available now (readinto1): a pipe is not waited on to fill the buffer
            if hasattr(self._rest, "readinto1"):
                return self._rest.readinto1(buffer)
            if hasattr(self._rest, "readinto"):
                return self._rest.readinto(buffer)
            chunk = self._rest.read(len(buffer))
        except (EOFError, lzma.LZMAError) as exc:
            raise OSError(f"cannot decompress: {exc}") from None
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        try:
            self._rest.close()
            self._raw.close()
        finally:
            super().close()
