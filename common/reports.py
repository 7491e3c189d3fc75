"""What a producer's REPORT may say: the one schema both sides share.

A worker sends its own cumulative counters to the broker (broker.protocol REPORT); the broker
keeps the latest per producer and shows it in /stats and /metrics, so it checks every report
against this schema first (`check_report`) and refuses one that does not fit:

    {"name": "worker-0@host",                 optional; a string of at most MAX_NAME_CHARS
     "skipped": {"field_count": 2, ...}}      optional; known reasons only, integer counts >= 0

SKIP_REASONS is the one list of reasons a row can be skipped for. An input format that adds a
reason adds it here (both the streamer and the broker read it), so /metrics never grows a label
series for a name a peer made up.
"""

from __future__ import annotations

SKIP_REASONS = (
    "field_count",
    "invalid_utf8",
    "field_too_large",
    "malformed",
    "bad_value",
    "message_too_large",
    "filtered",  # replay (streamer.replay): not matching --filter
    "bad_timestamp",  # replay: no time in the --timestamp-column
)
REPORT_KEYS = frozenset({"name", "skipped"})
MAX_NAME_CHARS = 256
MAX_COUNT = 2**63 - 1  # counts are int64 in /metrics


def check_report(value: object, reasons: frozenset[str] | tuple[str, ...] = SKIP_REASONS) -> str | None:
    """None if `value` (a decoded JSON report) fits the schema, else why not (one short phrase)."""
    if not isinstance(value, dict):
        return "not an object"
    unknown = value.keys() - REPORT_KEYS
    if unknown:
        return "unknown key"
    name = value.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        return "bad name"
    skipped = value.get("skipped", {})
    if not isinstance(skipped, dict):
        return "skipped is not an object"
    for reason, count in skipped.items():
        if reason not in reasons:
            return "unknown skip reason"
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            return "bad count"
    return None
