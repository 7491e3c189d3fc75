import pytest

from broker.protocol import DUPLICATE
from broker.topic import SequenceGap, Topic

A, B = b"a" * 16, b"b" * 16


def body(*values):
    return b"\n".join(b'{"v":%d}' % v for v in values)


def test_offsets_are_contiguous_across_producers():
    topic = Topic("t")
    assert topic.append(A, 0, 2, body(1, 2))[:2] == (0, 2)
    assert topic.append(B, 100, 3, body(1, 2, 3))[:2] == (2, 3)  # a new producer starts anywhere
    assert topic.append(A, 2, 1, body(3))[:2] == (5, 1)
    assert topic.messages == 6 and topic.next_offset == 6
    assert topic.bytes == 6 * len(b'{"v":1}')


def test_a_batch_already_held_is_a_duplicate_and_not_stored():
    topic = Topic("t")
    topic.append(A, 0, 3, body(1, 2, 3))
    assert topic.append(A, 0, 3, body(1, 2, 3))[:3] == (DUPLICATE, 0, b"")
    assert topic.messages == 3 and topic.duplicates == 3


def test_overlapping_batch_stores_only_its_new_tail():
    topic = Topic("t")
    topic.append(A, 0, 2, body(1, 2))
    assert topic.append(A, 1, 3, body(2, 3, 4))[:3] == (2, 2, body(3, 4))
    assert topic.producers[A].next_seq == 4 and topic.duplicates == 1


def test_a_gap_is_refused_with_the_expected_sequence():
    topic = Topic("t")
    topic.append(A, 0, 2, body(1, 2))
    with pytest.raises(SequenceGap) as gap:
        topic.append(A, 5, 1, body(6))
    assert gap.value.expected == 2
    assert topic.messages == 2


def test_skipped_sums_the_latest_report_of_each_producer():
    topic = Topic("t")
    topic.append(A, 0, 1, body(1))
    topic.append(B, 0, 1, body(1))
    topic.producers[A].report = {"skipped": {"field_count": 2}}
    topic.producers[A].report = {"skipped": {"field_count": 3}}  # reports are cumulative: the latest wins
    topic.producers[B].report = {"skipped": {"field_count": 1, "invalid_utf8": 4}}
    assert topic.skipped() == {"field_count": 4, "invalid_utf8": 4}


def test_rate_over_the_recent_window():
    topic = Topic("t")
    start = topic.created
    topic.append(A, 0, 100, body(*range(100)))
    topic.sample_rate(start + 1)
    topic.append(A, 100, 100, body(*range(100)))
    assert topic.rate(start + 2) == pytest.approx(100.0)


def test_rate_window_slides_past_an_old_burst():
    """A burst long ago stops counting: once the window has moved past it, an idle topic's rate is 0."""
    topic = Topic("t")
    start = topic.created
    topic.append(A, 0, 1000, body(*range(1000)))
    topic.sample_rate(start + 1)
    for second in range(2, 31):  # idle for 30 s, sampled once a second
        topic.sample_rate(start + second)
    assert topic.rate(start + 30) == 0.0
    topic.append(A, 1000, 50, body(*range(50)))
    assert topic.rate(start + 31) == pytest.approx(50 / 11, rel=0.2)  # the last ~10 s only
