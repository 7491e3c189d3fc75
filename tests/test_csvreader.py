"""The strict reader against Python's csv module: the same rows on valid RFC 4180 input, and on
damaged input never more than the damaged rows lost (each damaged row malformed, the rest exact)."""

import csv
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.csvreader import Malformed, Reader, excel_sep, parse_delimiter, sniff

FIELD = st.text(alphabet=st.sampled_from('ab1 ,;"\r\n\tx'), max_size=8)
SIMPLE = st.text(alphabet=st.sampled_from('ab1 ,;"x'), max_size=8)  # no line breaks inside values


def encode(rows, delimiter=",", lineterminator="\r\n") -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator=lineterminator, quoting=csv.QUOTE_MINIMAL).writerows(rows)
    return out.getvalue()


def read(text: str, delimiter=",", **kw) -> list:
    reader = Reader(io.StringIO(text, newline=""), delimiter, **kw)
    return [(reader.line, row if isinstance(row, list) else row.reason) for row in reader]


def rows_only(text, delimiter=","):
    return [row for _, row in read(text, delimiter)]


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(FIELD, min_size=2, max_size=4), min_size=1, max_size=12), delimiter=st.sampled_from([",", ";", "\t", "|"]))
def test_valid_rfc4180_gives_the_csv_modules_rows(rows, delimiter):
    # values without leading spaces: the reader drops spaces after a delimiter (nvidia-smi), csv does not
    rows = [[v.lstrip(" ") for v in row] for row in rows]
    text = encode(rows, delimiter)
    expected = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True) if r]
    assert rows_only(text, delimiter) == expected


@settings(max_examples=250, deadline=None)
@given(
    rows=st.lists(st.lists(SIMPLE, min_size=2, max_size=4), min_size=2, max_size=12),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.sampled_from(['"', "", 'x"', '""'])), min_size=1, max_size=3),
)
def test_damaged_input_costs_only_the_damaged_rows(rows, damage):
    rows = [[v.lstrip(" ") or "v" for v in row] for row in rows]  # no row that is only blank
    lines = [encode([row]) for row in rows]
    damaged = set()
    for row_pick, pos_pick, insert in damage:
        i = row_pick % len(lines)
        line = lines[i]
        pos = pos_pick % (len(line) - 1)  # never the line break itself
        lines[i] = line[:pos] + insert + line[pos + (0 if insert else 1) :]  # "" deletes a character
        damaged.add(i + 1)
    got = read("".join(lines))
    by_line = dict(got)
    assert len(got) <= len(rows)
    # an undamaged line comes through exactly, at its own line number: damage never swallows it,
    # except between two damaged lines, whose quotes may pair up into one valid multi-line field
    # (`"v,v` ... `v",v`: RFC 4180 itself reads the lines between as that field's text)
    for number, row in enumerate(rows, 1):
        enclosed = any(a < number for a in damaged) and any(number < b for b in damaged)
        if number not in damaged and not enclosed:
            assert by_line[number] == row
    for result in by_line.values():
        assert isinstance(result, list) or result == "malformed"


def test_each_kind_of_bad_quote_costs_one_row():
    text = 'a,b\n1"2,3\n"x"y,4\n"open,5\n6,7\n"two\nlines",8\n9,10\n'
    assert read(text) == [
        (1, ["a", "b"]),
        (2, "malformed"),  # a quote inside an unquoted field
        (3, "malformed"),  # text after the closing quote
        (4, "malformed"),  # never closed: reading resumes on line 5
        (5, ["6", "7"]),
        (6, ["two\nlines", "8"]),
        (8, ["9", "10"]),
    ]


def test_a_stray_quote_after_a_field_that_spans_lines_is_found_where_it_is():
    # the closing line holds two quotes (closing, stray): counting quotes took it for still open
    # and gathered every line after it to the end or the size limit, calling it never closed
    lines = ["a,b\n", '"two\n', 'lines",x"y\n'] + [f"{i},{i}\n" for i in range(1000)]
    reader = Reader(iter(lines), ",")
    rows = list(reader)
    assert rows[0] == ["a", "b"]
    assert isinstance(rows[1], Malformed) and "broken after its closing quote" in rows[1].detail
    assert rows[-1000:] == [[str(i), str(i)] for i in range(1000)]


def test_a_record_of_many_quoted_fields_across_lines_is_read_whole():
    fields = [f"v{i}\nw{i}" for i in range(2000)]  # 2,000 fields of two lines: one record of 4,001 lines
    text = "h\n" + ",".join(f'"{f}"' for f in fields) + "\n1\n"
    assert rows_only(text) == [["h"], fields, ["1"]]


def test_unclosed_quote_costs_at_most_the_size_limit():
    lines = ["a,b\n", '"open,1\n'] + [f"x,{i}\n" for i in range(100_000)]
    reader = Reader(iter(lines), ",", max_field_bytes=1000)
    rows = iter(reader)
    assert next(rows) == ["a", "b"]
    bad = next(rows)
    assert isinstance(bad, Malformed) and "within 1000 bytes" in bad.detail
    assert next(rows) == ["x", "0"] and reader.line == 3
    assert sum(1 for _ in rows) == 99_999


def test_field_over_the_limit_in_bytes_not_characters():
    snowmen = "☃" * 400  # 400 characters, 1200 bytes
    assert read(f'a,b\n1,{snowmen}\n2,"{snowmen}"\n3,{"x" * 400}\n', max_field_bytes=1000) == [
        (1, ["a", "b"]),
        (2, "field_too_large"),
        (3, "field_too_large"),
        (4, ["3", "x" * 400]),
    ]


def test_spaces_after_delimiters_are_dropped_as_nvidia_smi_writes_them():
    assert rows_only('name, utilization.gpu [%], note\nA100, 45 %, "a, b"\n') == [["name", "utilization.gpu [%]", "note"], ["A100", "45 %", "a, b"]]


def test_comment_lines_are_skipped_but_not_inside_quoted_fields():
    assert read('# exported\na,b\n#x,y\n1,"2\n#3"\n', comment="#") == [(2, ["a", "b"]), (4, ["1", "2\n#3"])]


def test_sniff_and_excel_sep():
    assert sniff(["a;b;c\n", "1,5;2,25;x\n", "2,5;3;y\n"]) == ";"
    assert sniff(["a\tb\n", "1\t2\n"]) == "\t"
    assert sniff(["a|b\n", "1|2\n"]) == "|"
    assert sniff(['"x,y";b\n', '"1,2";3\n']) == ";"  # delimiters inside quotes do not count
    assert sniff(["single\n", "1\n"]) == ","
    assert excel_sep("sep=;\r\n") == ";" and excel_sep("sep=\t\n") == "\t" and excel_sep("a,b\n") is None


def test_parse_delimiter_names():
    assert [parse_delimiter(v) for v in ("auto", "tab", ",", ";", "|", "\\t", "TAB")] == [None, "\t", ",", ";", "|", "\t", "\t"]
    for bad in ('"', ",,", "\n", ""):
        try:
            parse_delimiter(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
