"""The inputs people actually have, read through CsvSource: dialects, nvidia-smi and DCGM exports,
Excel and European CSV, encodings, compression, several files. Sample files are in tests/data/
or made here."""

import bz2
import gzip
import lzma
import os

import orjson
import pytest
import zstandard

from streamer.csvsource import CsvError, CsvFormat, CsvSource, check_csv
from streamer.inputs import expand

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def rows(paths, fmt=CsvFormat(), column_types=None, **kw) -> list[dict]:
    return [orjson.loads(r) for r in CsvSource(paths, column_types or {}, fmt=fmt, **kw).open_pass()]


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_nvidia_smi_csv_units_are_dropped_and_na_is_null():
    got = rows(os.path.join(DATA, "nvidia-smi.csv"))
    assert got[0] == {
        "timestamp": "2024/05/14 10:21:03.123",
        "name": "NVIDIA A100-SXM4-80GB",
        "pci.bus_id": "00000000:07:00.0",
        "driver_version": "535.129.03",
        "pstate": "P0",
        "temperature.gpu": 34,
        "utilization.gpu [%]": 45,
        "utilization.memory [%]": 3,
        "memory.total [MiB]": 81920,
        "memory.used [MiB]": 1024,
        "power.draw [W]": 62.14,
        "fan.speed [%]": None,
        "clocks.sm [MHz]": 1410,
    }
    assert got[1]["fan.speed [%]"] is None and got[1]["utilization.gpu [%]"] == 100  # [Not Supported]
    assert got[2]["power.draw [W]"] is None and got[2]["utilization.gpu [%]"] == 0


def test_nvidia_smi_nounits_gives_the_same_values():
    assert rows(os.path.join(DATA, "nvidia-smi-nounits.csv")) == rows(os.path.join(DATA, "nvidia-smi.csv"))


def test_forced_column_types_accept_surrounding_spaces_and_units(tmp_path):
    path = write(tmp_path, "f.csv", b"gpu, utilization [%], active\n0,  45 %, yes \n1, 7 , no\n")
    got = rows(path, column_types={"utilization [%]": "int", "active": "bool", "gpu": "float"})
    assert got == [{"gpu": 0.0, "utilization [%]": 45, "active": True}, {"gpu": 1.0, "utilization [%]": 7, "active": False}]


def test_null_values_option(tmp_path):
    path = write(tmp_path, "n.csv", b"a,b,c\n-,NA,1\n")
    assert rows(path, CsvFormat(null_values=("-", "NA"))) == [{"a": None, "b": None, "c": 1}]
    assert rows(path) == [{"a": "-", "b": "NA", "c": 1}]


def test_dcgm_export_quoted_fields_and_embedded_quotes():
    got = rows(os.path.join(DATA, "dcgm-export.csv"))
    assert len(got) == 3
    assert got[0]["value"] == 87 and got[2]["value"] == 512.337 and got[1]["pod"] == "job-7f9c"
    assert got[0]["labels_raw"].startswith('DCGM_FI_DRIVER_VERSION="550.54.15",Hostname="node-a17"')


def test_european_csv_semicolons_are_sniffed_and_zip_codes_stay_strings():
    checked = check_csv(os.path.join(DATA, "european.csv"))
    assert checked.delimiter == ";" and checked.delimiter_from == "sniffed"
    got = rows(os.path.join(DATA, "european.csv"))
    assert got[0] == {"Zeitstempel": "2025-03-02 08:15:00", "GPU": 0, "Auslastung": "87,5", "Temperatur": 41, "PLZ": "08123"}
    assert [r["PLZ"] for r in got] == ["08123", "01067", 80331]


def test_excel_sep_line_names_the_delimiter_and_is_not_the_header():
    checked = check_csv(os.path.join(DATA, "excel-sep.csv"))
    assert (checked.header, checked.delimiter, checked.delimiter_from) == (["gpu_id", "utilization", "hostname"], ";", "sep= line")
    assert rows(os.path.join(DATA, "excel-sep.csv")) == [
        {"gpu_id": 0, "utilization": 45, "hostname": "node-1"},
        {"gpu_id": 1, "utilization": 50, "hostname": "node;2"},
    ]


@pytest.mark.parametrize("delimiter, name", [("\t", "tab"), ("|", "pipe"), (";", "semicolon")])
def test_other_delimiters_are_sniffed(tmp_path, delimiter, name):
    d = delimiter.encode()
    path = write(tmp_path, f"{name}.csv", b"a%sb%sc\n1%s2.5%sx y\n3%s4%sz\n" % ((d,) * 6))
    assert rows(path) == [{"a": 1, "b": 2.5, "c": "x y"}, {"a": 3, "b": 4, "c": "z"}]


def test_explicit_delimiter_wins_over_sniffing(tmp_path):
    path = write(tmp_path, "x.csv", b"a;b,c\n1;2,3\n")
    assert rows(path, CsvFormat(delimiter=",")) == [{"a;b": "1;2", "c": 3}]


def test_skip_rows_and_comment(tmp_path):
    path = write(tmp_path, "pre.csv", b"Exported by tool 1.2\nhost: node-1\n# columns follow\na,b\n1,2\n# a note\n3,4\n")
    assert rows(path, CsvFormat(skip_rows=2, comment="#")) == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


def test_values_print_back_as_they_were(tmp_path):
    path = write(tmp_path, "v.csv", b"a,b,c,d,e,f,g\n007,08123,0,9223372036854775808,18446744073709551616,1e-400,1e400\n")
    encoded = next(CsvSource(path, {}).open_pass())
    assert encoded == b'{"a":"007","b":"08123","c":0,"d":9223372036854775808,"e":"18446744073709551616","f":"1e-400","g":"1e400"}'


@pytest.mark.parametrize(
    "encoding, bom",
    [
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("utf-32-le", b"\xff\xfe\x00\x00"),
        ("utf-32-be", b"\x00\x00\xfe\xff"),
    ],
)
def test_byte_order_marks_pick_the_encoding(tmp_path, encoding, bom):
    path = write(tmp_path, "bom.csv", bom + "gpu,name\r\n0,Grüße\r\n".encode(encoding))
    assert rows(path) == [{"gpu": 0, "name": "Grüße"}]


def test_utf16_without_bom_is_refused_with_a_hint_unless_named(tmp_path):
    path = write(tmp_path, "u16.csv", "gpu,name\n0,a\n".encode("utf-16-le"))
    with pytest.raises(CsvError, match=r"UTF-16 without a byte-order mark: give --encoding=utf-16-le"):
        check_csv(path)
    assert rows(path, CsvFormat(encoding="utf-16-le")) == [{"gpu": 0, "name": "a"}]


def test_other_encodings_by_name(tmp_path):
    path = write(tmp_path, "latin.csv", "ville,n\nMünchen,1\n".encode("latin-1"))
    assert rows(path, CsvFormat(encoding="latin-1")) == [{"ville": "München", "n": 1}]
    source = CsvSource(path, {})  # read as UTF-8 the row is skipped, not the file refused
    assert list(source.open_pass()) == [] and source.skipped["invalid_utf8"] == 1


COMPRESSORS = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_files_are_recognized_by_their_first_bytes(tmp_path, kind):
    data = b"gpu,util\n" + b"".join(b"%d,%d\n" % (i, i % 100) for i in range(5000))
    path = write(tmp_path, "metrics.csv", COMPRESSORS[kind](data))  # no telling suffix
    assert check_csv(path).header == ["gpu", "util"]
    source = CsvSource(path, {})
    first = [orjson.loads(r) for r in source.open_pass()]
    assert len(first) == 5000 and first[4999] == {"gpu": 4999, "util": 99}
    assert [orjson.loads(r) for r in source.open_pass()] == first  # the next pass replays


def test_compressed_utf16_with_bom(tmp_path):
    path = write(tmp_path, "x.csv.gz", gzip.compress(b"\xff\xfe" + "a;b\n1;2\n".encode("utf-16-le")))
    assert rows(path) == [{"a": 1, "b": 2}]


def test_several_files_each_with_its_own_header_in_order(tmp_path):
    a = write(tmp_path, "a.csv", b"x,y\n1,2\n")
    b = write(tmp_path, "b.csv", b"name;value\nn;3\n")
    source = CsvSource([a, b], {})
    assert [orjson.loads(r) for r in source.take(5)] == [{"x": 1, "y": 2}, {"name": "n", "value": 3}] * 2 + [{"x": 1, "y": 2}]


def test_glob_and_directory_expand_sorted(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("c.csv", "a.csv", "b.csv", "notes.txt"):
        (logs / name).write_bytes(b"f\n%s\n" % name.encode())
    assert expand([str(logs / "*.csv")]) == [str(logs / n) for n in ("a.csv", "b.csv", "c.csv")]
    assert expand([str(logs)]) == expand([str(logs / "*.csv")])
    assert [r["f"] for r in rows(expand([str(logs)]))] == ["a.csv", "b.csv", "c.csv"]
    assert expand(["-", "/dev/stdin"]) == ["-", "-"]


def test_first_data_row_with_an_oversize_field_is_a_skipped_row(tmp_path):
    path = write(tmp_path, "big.csv", b"a,b\n1," + b"x" * 2000 + b"\n2,3\n")
    assert check_csv(path).header == ["a", "b"]
    source = CsvSource(path, {}, max_field_bytes=1000)
    assert [orjson.loads(r) for r in source.open_pass()] == [{"a": 2, "b": 3}]
    assert source.skipped == {"field_too_large": 1}
