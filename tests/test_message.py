import re
import time

import orjson

from streamer.message import Envelope

RFC3339_NS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")


def test_batch_wraps_each_row_with_its_own_nanosecond_timestamp():
    rows = [orjson.dumps({"gpu_id": i, "active": True}) for i in range(50)]
    before = time.time_ns()
    body = Envelope().batch(rows)
    after = time.time_ns()
    messages = [orjson.loads(line) for line in body.split(b"\n")]
    assert len(messages) == 50
    stamps = []
    for i, message in enumerate(messages):
        assert list(message) == ["timestamp", "fields"]
        assert message["fields"] == {"gpu_id": i, "active": True}
        assert RFC3339_NS.fullmatch(message["timestamp"])
        seconds = time.mktime(time.strptime(message["timestamp"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        stamps.append(int(seconds) * 1_000_000_000 + int(message["timestamp"][20:29]))
    assert stamps == sorted(stamps)
    assert before - 1_000_000_000 < stamps[0] and stamps[-1] <= after


def test_prefix_follows_the_clock_across_seconds(monkeypatch):
    import streamer.message as message

    clock = iter([1_760_707_661_999_999_999, 1_760_707_662_000_000_001])
    monkeypatch.setattr(message, "time_ns", lambda: next(clock))
    body = Envelope().batch([b"{}", b"{}"])
    assert body == (b'{"timestamp":"2025-10-17T13:27:41.999999999Z","fields":{}}\n{"timestamp":"2025-10-17T13:27:42.000000001Z","fields":{}}')
