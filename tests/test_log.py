"""The topic log: framing, recovery at any byte, retention, reading from an offset, write errors."""

import errno
import io
import logging
import os
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import segmentlog as tlog
from broker.protocol import DUPLICATE
from broker.segmentlog import HEADER_SIZE, LogUnavailable, TopicLog, list_segments, read_records, segment_name
from broker.topic import Topic

P1, P2 = b"\x01" * 16, b"\x02" * 16


def open_log(directory, **overrides) -> TopicLog:
    settings_ = dict(segment_bytes=1 << 20, fsync="never", fsync_interval_s=1.0, retention_bytes=1 << 30, retention_age_s=None)
    settings_.update(overrides)
    topic_log = TopicLog(str(directory), **settings_)
    topic_log.open()
    return topic_log


def payload(*values) -> bytes:
    return b"\n".join(orjson.dumps({"v": v}) for v in values)


def write_batches(topic_log, sizes, producer=P1):
    """Append batches of the given sizes; returns [(base offset, messages)]."""
    written, seq = [], topic_log.producers.get(producer, 0)
    for size in sizes:
        values = list(range(seq, seq + size))
        base = topic_log.append(producer, seq, size, payload(*values), 1_700_000_000_000_000_000 + seq)
        written.append((base, values))
        seq += size
    return written


def records(directory, from_offset=0):
    return [
        (offset, batch.producer, batch.base_seq + offset - batch.base_offset, orjson.loads(m)["v"])
        for offset, batch, m in read_records(str(directory), from_offset)
    ]


_messages = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=20)
_u63 = st.integers(0, 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(
    messages=_messages,
    base_offset=_u63,
    producer=st.binary(min_size=16, max_size=16),
    base_seq=_u63,
    received=_u63,
    magic=st.sampled_from([tlog.MAGIC_CRC32C, tlog.MAGIC_CRC32]),
    flip=st.data(),
)
def test_batch_framing_round_trips_and_refuses_any_damaged_byte(messages, base_offset, producer, base_seq, received, magic, flip):
    body = b"\n".join(messages)
    data = tlog.encode_batch(base_offset, producer, base_seq, received, len(messages), body, magic) + body
    assert data[:4] == magic
    batch = tlog.read_batch(io.BytesIO(data), 0)
    assert batch == tlog.Batch(0, base_offset, len(messages), producer, base_seq, received, body)
    assert batch.payload.split(b"\n") == messages and batch.size == len(data)
    cut = flip.draw(st.integers(0, len(data) - 1), label="cut")
    assert tlog.read_batch(io.BytesIO(data[:cut]), 0) is None  # torn: never read as a batch
    where = flip.draw(st.integers(0, len(data) - 1), label="where")
    damaged = bytearray(data)
    damaged[where] ^= flip.draw(st.integers(1, 255), label="xor")
    assert tlog.read_batch(io.BytesIO(bytes(damaged)), 0) is None  # either CRC catches every single-byte error


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.tuples(st.sampled_from([P1, P2]), _messages), min_size=1, max_size=25),
    segment_bytes=st.integers(200, 4000),
    start=st.integers(0, 400),
)
def test_log_round_trip_across_segments_and_reopen(tmp_path_factory, batches, segment_bytes, start):
    directory = tmp_path_factory.mktemp("log")
    topic_log = open_log(directory, segment_bytes=segment_bytes)
    expected, seqs = [], {P1: 0, P2: 0}
    for producer, messages in batches:
        base = topic_log.append(producer, seqs[producer], len(messages), b"\n".join(messages), 7)
        assert base == len(expected)
        expected += [(base + i, producer, seqs[producer] + i, m) for i, m in enumerate(messages)]
        seqs[producer] += len(messages)
    topic_log.close()
    reopened = open_log(directory, segment_bytes=segment_bytes)  # recovery finds nothing to drop
    assert reopened.next_offset == len(expected) and reopened.stats()["recovery_dropped_bytes"] == 0
    assert {p: reopened.producers[p] for p in reopened.producers} == {p: n for p, n in seqs.items() if n}
    reopened.close()
    read = [(offset, b.producer, b.base_seq + offset - b.base_offset, m) for offset, b, m in read_records(str(directory), start)]
    assert read == expected[start:]


def test_round_trip_offsets_and_sequences(tmp_path):
    topic_log = open_log(tmp_path)
    write_batches(topic_log, [3, 1, 2])
    write_batches(topic_log, [2], producer=P2)
    topic_log.close()
    assert records(tmp_path) == [
        (0, P1, 0, 0),
        (1, P1, 1, 1),
        (2, P1, 2, 2),
        (3, P1, 3, 3),
        (4, P1, 4, 4),
        (5, P1, 5, 5),
        (6, P2, 0, 0),
        (7, P2, 1, 1),
    ]
    assert records(tmp_path, from_offset=5) == [(5, P1, 5, 5), (6, P2, 0, 0), (7, P2, 1, 1)]


def test_reopen_continues_offsets_and_recognises_retries(tmp_path):
    topic_log = open_log(tmp_path)
    write_batches(topic_log, [5])
    topic_log.close()
    reopened = open_log(tmp_path)
    assert reopened.next_offset == 5 and reopened.producers == {P1: 5}
    topic = Topic("t", reopened)
    assert topic.append(P1, 0, 5, payload(0, 1, 2, 3, 4))[0] == DUPLICATE  # a retry after the restart
    assert topic.append(P1, 5, 1, payload(5))[0] == 5


def test_segments_roll_and_reads_seek_through_the_index(tmp_path):
    topic_log = open_log(tmp_path, segment_bytes=200_000)
    write_batches(topic_log, [20] * 2000)
    topic_log.close()
    bases = list_segments(str(tmp_path))
    assert len(bases) >= 3 and bases[0] == 0
    index = os.path.join(tmp_path, segment_name(bases[1]) + ".index")
    assert os.path.getsize(index) >= 2 * tlog.INDEX_ENTRY.size  # sparse, but more than one entry
    assert [r[0] for r in records(tmp_path)] == list(range(40_000))
    with open(index, "rb") as f:
        second_entry_offset = tlog.INDEX_ENTRY.unpack_from(f.read(), tlog.INDEX_ENTRY.size)[0]
    middle = second_entry_offset + 5
    assert tlog._index_position(index, middle) > 0  # the read seeks into the segment
    assert [r[0] for r in records(tmp_path, from_offset=middle)] == list(range(middle, 40_000))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8), where=st.floats(0, 1, exclude_max=True), damage=st.sampled_from(["truncate", "flip", "zero"]))
def test_recovery_keeps_exactly_the_batches_before_the_damage(tmp_path_factory, sizes, where, damage):
    directory = tmp_path_factory.mktemp("torn")
    topic_log = open_log(directory)
    written = write_batches(topic_log, sizes)
    topic_log.close()
    path = os.path.join(directory, segment_name(0) + ".log")
    original = open(path, "rb").read()
    data = bytearray(original)
    at = int(where * len(data))
    if damage == "truncate":
        data = data[:at]
    elif damage == "flip":
        data[at] ^= 0xFF
    else:
        data[at : at + 8] = bytes(len(data[at : at + 8]))
    with open(path, "wb") as f:
        f.write(data)
    # where the bytes really differ (zeroing bytes that were zero damages nothing)
    at = next((i for i, (a, b) in enumerate(zip(original, data)) if a != b), min(len(data), len(original)))
    if at == len(original):
        at = len(original) + 1
    # the batches wholly before the damaged byte survive; nothing from the damaged one on does
    kept, end = [], 0
    for base, values in written:
        size = HEADER_SIZE + len(payload(*values))
        if end + size > at:
            break
        kept.append((base, values))
        end += size
    recovered = open_log(directory)
    assert recovered.recovered_dropped_bytes == len(data) - end
    assert recovered.next_offset == sum(len(v) for _, v in kept)
    expected = [(offset, P1, value, value) for base, values in kept for offset, value in zip(range(base, base + len(values)), values)]
    assert records(directory) == expected
    more = write_batches(recovered, [2])  # offsets and sequences continue from the last good record
    assert more[0][0] == recovered.next_offset - 2
    recovered.close()


def test_batches_checksummed_with_crc32_are_read_recovered_and_appended_to(tmp_path, monkeypatch, caplog):
    """Logs written with zlib's CRC-32 (before CRC-32C, or without google-crc32c's compiled
    implementation) stay readable: mixed segments, a damaged old batch resynchronised past, a
    torn tail recovered, appends continuing with CRC-32C."""
    with monkeypatch.context() as m:
        m.setattr(tlog, "MAGIC", tlog.MAGIC_CRC32)
        old = open_log(tmp_path, segment_bytes=4096)
        write_batches(old, [10] * 30)
        old.close()
    assert tlog.MAGIC == tlog.MAGIC_CRC32C  # google-crc32c's C implementation is installed
    bases = list_segments(str(tmp_path))
    first = os.path.join(tmp_path, segment_name(bases[0]) + ".log")
    assert open(first, "rb").read(4) == tlog.MAGIC_CRC32
    with open(first, "r+b") as f:  # damage the first batch of the oldest segment
        f.seek(HEADER_SIZE + 5)
        f.write(b"#")
    newest = os.path.join(tmp_path, segment_name(bases[-1]) + ".log")
    with open(newest, "r+b") as f:  # and tear the newest segment's last batch
        f.truncate(os.path.getsize(newest) - 3)
    with caplog.at_level(logging.WARNING):
        reopened = open_log(tmp_path, segment_bytes=4096)
        assert reopened.next_offset == 290 and reopened.producers == {P1: 290}
        write_batches(reopened, [10, 10])  # new batches: CRC-32C, after the CRC-32 ones
        reopened.close()
        offsets = [r[0] for r in records(tmp_path)]
    assert offsets == list(range(10, 310))
    with open(os.path.join(tmp_path, segment_name(list_segments(str(tmp_path))[-1]) + ".log"), "rb") as f:
        data = f.read()
    assert data.count(tlog.MAGIC_CRC32C) >= 1 and data.startswith(tlog.MAGIC_CRC32)  # one segment, both kinds
    assert any("damaged batch" in r.getMessage() for r in caplog.records)


def test_damage_in_an_older_segment_is_reported_and_skipped(tmp_path, caplog):
    topic_log = open_log(tmp_path, segment_bytes=4096)
    write_batches(topic_log, [10] * 100)
    topic_log.close()
    bases = list_segments(str(tmp_path))
    assert len(bases) >= 3  # bases[1] is an older segment, not the newest
    victim = os.path.join(tmp_path, segment_name(bases[1]) + ".log")
    with open(victim, "r+b") as f:
        f.seek(HEADER_SIZE + 5)  # inside the first batch's payload
        f.write(b"#")
    with caplog.at_level(logging.WARNING):
        topic_log = open_log(tmp_path, segment_bytes=4096)  # starts regardless
        offsets = [r[0] for r in records(tmp_path)]
    assert topic_log.next_offset == 1000
    assert len(offsets) == 990 and set(range(bases[1], bases[1] + 10)).isdisjoint(offsets)
    assert any("damaged batch" in r.getMessage() and segment_name(bases[1]) in r.getMessage() for r in caplog.records)


def test_retention_keeps_the_topic_within_the_bound_plus_one_segment(tmp_path):
    topic_log = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=64 << 10)
    for _ in range(100):
        write_batches(topic_log, [200])
        assert topic_log.stats()["bytes"] <= (64 << 10) + (16 << 10)
        # on disk: that, the active segment's file up to a whole segment (a recycled file) and the recycled file
        on_disk = sum(os.path.getsize(os.path.join(tmp_path, n)) for n in os.listdir(tmp_path) if n.endswith(".log"))
        assert on_disk <= (64 << 10) + 3 * (16 << 10)
    assert topic_log.first_offset > 0
    assert [r[0] for r in records(tmp_path)] == list(range(topic_log.first_offset, 20_000))


def _recycling_log(tmp_path):
    """A log whose retention has retired segments: the active segment overwrites a recycled file."""
    topic_log = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=48 << 10)
    write_batches(topic_log, [50] * 200)  # ~600 B per batch, ~27 per segment: 7 segments, 4 retired
    return topic_log


def _written_values(written) -> dict[int, int]:
    """offset -> the value written there, from write_batches' results."""
    return {base + i: value for base, values in written for i, value in enumerate(values)}


def test_retired_segments_are_recycled_and_readers_never_see_their_remains(tmp_path):
    topic_log = _recycling_log(tmp_path)
    inodes_seen, written = set(), []
    for _ in range(40):  # every segment from here on starts in a recycled file: no new inode
        written += write_batches(topic_log, [50], producer=P2)
        inodes_seen.add(os.fstat(topic_log.active.fd).st_ino)
    assert os.path.exists(os.path.join(tmp_path, tlog.RECYCLED_NAME))
    assert len(inodes_seen) <= 3, "the active segments should take turns on recycled files"
    active_file = os.path.getsize(topic_log.active.path)
    assert active_file > topic_log.active.size, "the test needs remains past the written end"
    expected = list(range(topic_log.first_offset, topic_log.next_offset))
    assert [r[0] for r in records(tmp_path)] == expected  # the dump's reader: by offsets alone
    topic = Topic("t", topic_log)
    assert [o for s in topic.history(0) for o in range(s.first_offset, s.first_offset + s.count)] == expected
    # every record read from the segments written since is the one written at its offset
    values = _written_values(written)
    assert [(o, v) for o, _, _, v in records(tmp_path, min(values))] == sorted(values.items())


def test_a_crash_while_writing_a_recycled_file_drops_nothing_of_its_remains(tmp_path, caplog):
    topic_log = _recycling_log(tmp_path)
    write_batches(topic_log, [50] * 3)
    end, next_offset = topic_log.active.size, topic_log.next_offset
    remains = os.path.getsize(topic_log.active.path) - end
    assert remains > 2000, "the test needs several batches of remains"
    body = payload(*range(50))  # a batch torn where the remains begin: its header and half its payload
    header = tlog.encode_batch(next_offset, P2, 0, 1, 50, body)
    os.pwrite(topic_log.active.fd, header + body[: len(body) // 2], end)
    os.close(topic_log.active.fd)  # killed: no trimming close
    with caplog.at_level(logging.WARNING):
        reopened = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=48 << 10)
    assert reopened.next_offset == next_offset
    # counted: the torn batch, up to where the remains' next whole batch starts; not the remains
    assert 0 < reopened.recovered_dropped_bytes < 1000 < remains
    assert os.path.getsize(reopened.active.path) == end
    write_batches(reopened, [50])
    assert [r[0] for r in records(tmp_path)] == list(range(reopened.first_offset, next_offset + 50))


def test_a_crash_between_batches_of_a_recycled_file_reports_no_drop(tmp_path, caplog):
    topic_log = _recycling_log(tmp_path)
    write_batches(topic_log, [7], producer=P2)  # a shorter batch: the end no longer lines up with a batch of the remains
    next_offset = topic_log.next_offset
    assert os.path.getsize(topic_log.active.path) > topic_log.active.size + 2000
    os.close(topic_log.active.fd)  # killed between two batches: what follows is the remains, from mid-batch
    with caplog.at_level(logging.WARNING):
        reopened = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=48 << 10)
    assert reopened.next_offset == next_offset
    assert reopened.recovered_dropped_bytes == 0
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_a_clean_close_trims_the_recycled_remains_and_a_restart_reports_no_drop(tmp_path):
    topic_log = _recycling_log(tmp_path)
    active_path, size = topic_log.active.path, topic_log.active.size
    assert os.path.getsize(active_path) > size
    topic_log.close()
    assert os.path.getsize(active_path) == size
    reopened = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=48 << 10)
    assert reopened.recovered_dropped_bytes == 0


def test_a_reader_of_a_segment_that_is_recycled_meanwhile_stops_at_what_it_wrote(tmp_path):
    topic_log = _recycling_log(tmp_path)
    oldest = topic_log.first_offset
    reader = tlog.read_batches(str(tmp_path), oldest)
    first = next(reader)  # the oldest segment is open in the reader now
    assert first.base_offset == oldest
    inode = os.stat(os.path.join(tmp_path, segment_name(oldest) + ".log")).st_ino
    values = _written_values(write_batches(topic_log, [50] * 200, producer=P2))  # retention retires it; a newer segment overwrites its file
    assert not os.path.exists(os.path.join(tmp_path, segment_name(oldest) + ".log"))
    assert inode in {os.stat(os.path.join(tmp_path, n)).st_ino for n in os.listdir(tmp_path) if n.endswith(".log")}, "its file was overwritten, not deleted"
    rest = list(reader)
    offsets = [first.base_offset] + [b.base_offset for b in rest]
    assert offsets == sorted(set(offsets)), "offsets go forward only: no batch of the newer segment from the old file"
    for batch in rest:  # what it read past the recycled file is what was written at those offsets
        if batch.base_offset in values:
            assert [orjson.loads(m)["v"] for m in batch.payload.split(b"\n")] == [values[batch.base_offset + i] for i in range(batch.count)]


def test_write_error_refuses_then_resumes_without_a_hole(tmp_path, monkeypatch):
    topic_log = open_log(tmp_path)
    write_batches(topic_log, [2])
    real = os.pwritev

    def disk_full(fd, buffers, offset):
        real(fd, [buffers[0][:10]], offset)  # a torn attempt lands on disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tlog.os, "pwritev", disk_full)
    with pytest.raises(LogUnavailable, match="No space"):
        topic_log.append(P1, 2, 1, payload(2), 0)
    assert topic_log.error == "No space left on device" and not topic_log.stats()["healthy"]
    monkeypatch.setattr(tlog.os, "pwritev", real)
    assert topic_log.append(P1, 2, 1, payload(2), 0) == 2
    assert topic_log.error is None
    topic_log.close()
    assert [r[3] for r in records(tmp_path)] == [0, 1, 2]
    assert open_log(tmp_path).recovered_dropped_bytes == 0


def test_unusable_directory_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        open_log(blocker / "topic")


def test_retention_age_deletes_segments_whose_newest_record_is_older(tmp_path):
    topic_log = open_log(tmp_path, segment_bytes=8 << 10, retention_age_s=3600)
    while len(topic_log.segments) < 3:
        write_batches(topic_log, [100])
    old, recent = topic_log.segments[:2], topic_log.segments[2:]
    two_hours_ago = time.time() - 7200
    for base in old:
        os.utime(tmp_path / (segment_name(base) + ".log"), (two_hours_ago, two_hours_ago))
    rolls = len(topic_log.segments)
    while len(topic_log.segments) == rolls:
        write_batches(topic_log, [100])  # retention runs when a segment rolls
    assert not set(old) & set(list_segments(str(tmp_path)))
    assert set(recent) <= set(list_segments(str(tmp_path)))  # within the age: kept
    assert topic_log.first_offset == recent[0]


def test_with_a_retention_age_retired_segments_are_deleted_not_recycled(tmp_path):
    topic_log = open_log(tmp_path, segment_bytes=16 << 10, retention_bytes=48 << 10, retention_age_s=3600.0)
    write_batches(topic_log, [50] * 200)
    assert topic_log.first_offset > 0, "retention by bytes retired segments"
    assert not os.path.exists(os.path.join(tmp_path, tlog.RECYCLED_NAME))
    assert os.path.getsize(topic_log.active.path) == topic_log.active.size, "a new file: no older records in it"


def test_a_planted_link_as_the_recycled_file_is_not_written_through(tmp_path):
    target = tmp_path.parent / f"{tmp_path.name}-target"
    target.write_bytes(b"precious")
    topic_log = open_log(tmp_path, segment_bytes=16 << 10)
    os.symlink(target, os.path.join(tmp_path, tlog.RECYCLED_NAME))
    written = write_batches(topic_log, [50] * 100)  # rolls several times
    assert target.read_bytes() == b"precious"
    assert os.path.islink(os.path.join(tmp_path, tlog.RECYCLED_NAME))
    assert [r[0] for r in records(tmp_path)] == list(range(written[0][0], topic_log.next_offset))
