"""The CSV deleted, truncated and replaced while workers read it: the workers keep running (no
restart), skip what is broken, wait for what is missing, and the drain stays exact."""

import os
import shutil
import signal

from helpers import start_streamer, summary, topic_stats, wait_until


def test_vanished_csv_is_retried_not_fatal(procs, sample_csv, tmp_path):
    path = tmp_path / "moving.csv"
    shutil.copy(sample_csv, path)
    proc, http = start_streamer(str(path), "--rate=0")
    procs.append(proc)
    wait_until(lambda: topic_stats(http)["messages"] > 0)
    os.unlink(path)
    proc.wait_for_line(r"cannot read .*moving.csv .*retrying in")
    path.write_bytes(b"gpu_id,active\n42,true\n")
    before = topic_stats(http)["messages"]
    wait_until(lambda: topic_stats(http)["messages"] > before + 10, message="streaming to resume")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    assert summary(proc.output)["published"] == summary(proc.output)["broker_accepted"]


def test_csv_truncated_mid_read_then_emptied_then_rewritten(procs, tmp_path):
    path = tmp_path / "shrinking.csv"
    rows = [b"%d,%d.25,node-%d" % (i, i % 100, i % 5) for i in range(40_000)]
    content = b"gpu_id,utilization,hostname\n" + b"\n".join(rows) + b"\n"
    path.write_bytes(content)
    # 2 x 2,000 messages/s: a pass takes 20 s, so the workers are in the middle of the file (read
    # as it is consumed) when it is cut
    proc, http = start_streamer(str(path), "--workers=2", "--rate=2000")
    procs.append(proc)
    wait_until(lambda: topic_stats(http)["messages"] >= 4000, message="4,000 messages")
    os.truncate(path, len(content) // 2 + 3)  # in place, in the middle of a row
    before = topic_stats(http)["messages"]
    wait_until(lambda: topic_stats(http)["messages"] >= before + 8000, timeout=60, message="streaming to go on past the cut")
    os.truncate(path, 0)  # no header at all now
    proc.wait_for_line(r"cannot read .*shrinking.csv .*retrying in", timeout=60)
    path.write_bytes(content[: len(content) // 4] + b"\n")
    before = topic_stats(http)["messages"]
    wait_until(lambda: topic_stats(http)["messages"] >= before + 4000, timeout=60, message="streaming to resume")
    workers = topic_stats(http)["workers"]
    assert [w["restarts"] for w in workers.values()] == [0, 0]  # nothing crashed
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output
    figures = summary(proc.output)
    assert figures["published"] == figures["broker_accepted"] and figures["unacknowledged"] == 0
