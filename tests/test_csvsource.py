import csv
import io
import os

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.csvsource import MAX_FIELD_BYTES, CsvError, CsvSource, NoUsableRows, check_csv


def write(tmp_path, data: bytes, name="t.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def one_pass(source: CsvSource) -> list[dict]:
    return [orjson.loads(row) for row in source.open_pass()]


def test_bom_crlf_and_rfc4180_quoting(tmp_path):
    data = b'\xef\xbb\xbfname,note,n\r\n"a, b","say ""hi""",1\r\nc,"two\r\nlines",2.5\r\n'
    rows = one_pass(CsvSource(write(tmp_path, data), {}))
    assert rows == [{"name": "a, b", "note": 'say "hi"', "n": 1}, {"name": "c", "note": "two\r\nlines", "n": 2.5}]


def test_columns_keep_header_order_and_types(tmp_path):
    data = b"gpu_id,utilization,temperature,memory_used,hostname,active\n0,0,41,4096,node-1,TRUE\n"
    row = next(CsvSource(write(tmp_path, data), {}).open_pass())
    assert row == b'{"gpu_id":0,"utilization":0,"temperature":41,"memory_used":4096,"hostname":"node-1","active":true}'


def test_forced_column_type_applies_to_every_row(tmp_path):
    rows = one_pass(CsvSource(write(tmp_path, b"id,active\n1,1\n2,0\n3,\n"), {"active": "bool", "id": "string"}))
    assert rows == [{"id": "1", "active": True}, {"id": "2", "active": False}, {"id": "3", "active": None}]


def test_bad_rows_are_skipped_counted_and_logged_with_line_numbers(tmp_path, caplog):
    big = b"x" * (MAX_FIELD_BYTES + 1)
    data = b"a,b\n1,2\n3\n4,\xff\xfe\n5," + big + b"\n6,7\n8,nope\n9,10\n"
    source = CsvSource(write(tmp_path, data), {"b": "int"})
    rows = one_pass(source)
    assert rows == [{"a": 1, "b": 2}, {"a": 6, "b": 7}, {"a": 9, "b": 10}]
    assert dict(source.skipped) == {"field_count": 1, "invalid_utf8": 1, "field_too_large": 1, "bad_value": 1}
    logged = " ".join(r.getMessage() for r in caplog.records)
    for line, reason in ((3, "field_count"), (4, "invalid_utf8"), (5, "field_too_large"), (7, "bad_value")):
        assert f"line {line} " in logged and reason in logged


def test_unchanged_file_is_replayed_from_cache_and_skips_counted_each_pass(tmp_path, caplog):
    path = write(tmp_path, b"a\n1\n2\n\xff\n")
    source = CsvSource(path, {})
    first = list(source.open_pass())
    assert source.inputs[0].cache is not None and source.inputs[0].cache.complete
    second = list(source.open_pass())
    assert second == first and second[0] is first[0]  # the same encoded objects: no re-parse
    assert source.skipped["invalid_utf8"] == 2
    assert sum("skipped line" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_edited_file_is_picked_up_on_the_next_pass(tmp_path):
    path = write(tmp_path, b"a\n1\n")
    source = CsvSource(path, {})
    assert one_pass(source) == [{"a": 1}]
    with open(path, "wb") as f:
        f.write(b"a,b\n2,x\n3,y\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert one_pass(source) == [{"a": 2, "b": "x"}, {"a": 3, "b": "y"}]


def test_file_over_the_cache_budget_is_streamed_every_pass(tmp_path):
    path = write(tmp_path, b"a\n" + b"".join(b"%d\n" % i for i in range(1000)))
    source = CsvSource(path, {}, cache_bytes=1000)
    assert len(one_pass(source)) == 1000
    assert source.inputs[0].cache is None
    assert len(one_pass(source)) == 1000


def test_missing_file_raises_oserror_for_the_worker_to_retry(tmp_path):
    with pytest.raises(OSError):
        CsvSource(str(tmp_path / "gone.csv"), {}).open_pass()


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"a,b\n", "no data rows"), (b"a,b\n\n\n", "no data rows"), (b"a,a\n1,2\n", "duplicate column"), (b"\xff\n1\n", "UTF-8")],
)
def test_check_csv_refuses_unusable_files(tmp_path, data, reason):
    with pytest.raises(CsvError, match=reason):
        check_csv(write(tmp_path, data))


def test_check_csv_refuses_missing_and_directories(tmp_path):
    with pytest.raises(CsvError, match="No such file"):
        check_csv(str(tmp_path / "missing.csv"))
    with pytest.raises(CsvError, match="directory"):
        check_csv(str(tmp_path))


def test_check_csv_accepts_and_returns_header(tmp_path):
    assert check_csv(write(tmp_path, b"\xef\xbb\xbfx,y\n1,2\n")).header == ["x", "y"]


def records_after_the_header(data: bytes) -> int:
    """How many records a CSV reader meets after the header: each non-blank row, and each place
    it cannot parse (it resumes after it). The rows a source emits and skips must add up to this."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", "surrogateescape"), newline=""))
    next(reader)
    records = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error:
            records += 1
            continue
        records += bool(row)


def well_formed(data: bytes) -> bool:
    """Whether the text is RFC 4180 CSV: Python's csv module in strict mode reads it without an
    error, and no unquoted field holds a quote (csv keeps a"b as a value; RFC 4180, and so our
    reader, does not: such a row is malformed, and the lines after it are read again)."""
    text = data.decode("utf-8-sig", "surrogateescape")
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), strict=True):
            pass
    except csv.Error:
        return False
    return not _quote_in_an_unquoted_field(text)


def _quote_in_an_unquoted_field(text: str) -> bool:
    """A character-by-character RFC 4180 walk (independent of the reader's regexes)."""
    inside, at_field_start = False, True
    i = 0
    while i < len(text):
        c = text[i]
        if inside:
            if c == '"':
                if text[i + 1 : i + 2] == '"':
                    i += 1
                else:
                    inside = False
        elif c == '"':
            if not at_field_start:
                return True
            inside = True
        at_field_start = not inside and c in ",\r\n"
        i += 1
    return False


# rows shaped like CSV: few or too many fields, empty fields, quotes, stray bytes
FIELD = st.one_of(st.sampled_from([b"", b"1", b"-2.5", b"true", b"x", b'"a,b"', b'"x""y"', b'"two\nlines"', b"\xff", b" "]), st.binary(max_size=6))
CSV_ROWS = st.lists(st.lists(FIELD, min_size=1, max_size=5).map(b",".join), max_size=20).map(lambda rows: b"".join(row + b"\n" for row in rows))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=400), CSV_ROWS))
def test_arbitrary_bytes_give_strict_json_rows_or_counted_skips(tmp_path, body):
    data = b"a,b,c\n" + body
    path = write(tmp_path, data, name="fuzz.csv")
    source = CsvSource(path, {})
    rows = list(source.open_pass())
    for row in rows:
        value = orjson.loads(row)
        assert list(value) == ["a", "b", "c"]
        assert b"\n" not in row
    assert set(source.skipped) <= {"field_count", "invalid_utf8", "field_too_large", "malformed"}
    accounted = len(rows) + sum(source.skipped.values())
    if well_formed(data):
        assert accounted == records_after_the_header(data)  # nothing dropped uncounted
    else:  # damaged quoting: the reader resumes at line boundaries, so it meets at least as many records as csv does
        assert accounted >= records_after_the_header(data)


def test_take_fills_batches_across_passes_of_a_small_file(tmp_path, monkeypatch):
    source = CsvSource(write(tmp_path, b"a\n1\n2\n3\n"), {})
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    batch = source.take(10)
    assert [orjson.loads(r)["a"] for r in batch] == [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    assert source.completed_passes == 3
    assert len([p for p in stats if p == source.path]) <= 2  # checked when the batch began, not per replay
    source.take(10)
    assert source.completed_passes == 6


def test_take_returns_rows_read_before_an_error_then_raises(tmp_path):
    path = write(tmp_path, b"a\n1\n2\n")
    source = CsvSource(path, {})
    assert len(source.take(2)) == 2
    os.unlink(path)
    with pytest.raises(OSError):
        source.take(5)


def test_take_raises_when_a_pass_has_no_usable_row(tmp_path):
    source = CsvSource(write(tmp_path, b"a,b\n1\n2\n"), {})
    with pytest.raises(NoUsableRows):
        source.take(5)
    assert source.skipped["field_count"] == 2


def test_rows_whose_message_would_exceed_the_cap_are_skipped(tmp_path):
    from streamer.message import Envelope

    data = b"note\n" + b"".join(b"%s\n" % (b"x" * n) for n in (10, 40, 41, 42, 200))
    probe = len(Envelope().batch([b'{"note":"' + b"x" * 41 + b'"}']))  # the message for the 41-char row
    source = CsvSource(write(tmp_path, data), {}, max_message_bytes=probe)
    rows = list(source.open_pass())
    messages = Envelope().batch(rows).split(b"\n")
    assert [len(orjson.loads(m)["fields"]["note"]) for m in messages] == [10, 40, 41]  # 41 fits exactly
    assert all(len(m) <= probe for m in messages)
    assert source.skipped["message_too_large"] == 2


def test_kept_rows_cost_about_their_length(tmp_path):
    """A cached row lives as long as the worker: it must not hold the whole buffer orjson wrote it
    into (4 KiB for a 100-byte row in orjson 3.10+, 1 KiB in 3.8): 1,000 such rows cost every
    worker 4 MB instead of 0.2."""
    import tracemalloc

    header = b"gpu_id,utilization,temperature,memory_used,hostname,active\n"
    path = write(tmp_path, header + b"".join(b"%d,39.2,52,31956,dgx-a100-01,true\n" % i for i in range(1000)))
    source = CsvSource(path, {})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rows = list(source.open_pass())
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    kept = source.inputs[0].cache.rows
    assert len(kept) == len(rows) == 1000 and rows[0] is kept[0]
    length = sum(len(row) for row in kept)  # ~100 bytes a row
    assert held <= 3 * length, (held, length)  # each a bytes object (33 bytes more), two lists
