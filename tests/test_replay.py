"""Replay (streamer.replay): pacing, shifted times, counters and profiles in virtual time
(deterministic), and --once / --shard / --filter / exit codes through the real command line."""

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict

import orjson
import pytest
from helpers import ROOT, Proc, VirtualClockLoop, dump, get_json, run_virtual, start_broker, start_streamer, start_streamer_to, summary, wait_until, workers_of

from streamer.config import ReplayConfig
from streamer.csvsource import CsvSource
from streamer.profile import parse_profile
from streamer.replay import ProfileRun, Replay, run_paced, run_profile
from streamer.timestamps import find_time_column, parse_time_ns

T0 = 1_760_707_661_000_000_000  # 2025-10-17T13:27:41Z


def recording(tmp_path, gaps_ms, per_time=2, name="rec.csv", form=lambda ns: str(ns // 1_000_000)):
    """A recording: `per_time` rows (gpu 0, 1, ...) at each time, times separated by gaps_ms; each
    GPU's `energy` counter rises by 10 per row."""
    lines = ["timestamp,gpu,energy,host"]
    t = T0
    energy = 100
    for gap in [0, *gaps_ms]:
        t += gap * 1_000_000
        energy += 10
        lines += [f"{form(t)},{g},{energy + g},h{g % 2}" for g in range(per_time)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def replay_of(path, index=0, **options):
    cfg = ReplayConfig(**options)
    return Replay(CsvSource(path, {}), cfg, index)


# -- row times -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2025-10-17T13:27:41Z", T0),
        ("2025-10-17T13:27:41.129926216Z", T0 + 129_926_216),
        ("2025-10-17 13:27:41.5", T0 + 500_000_000),
        ("2025-10-17T15:27:41+02:00", T0),
        ("2025/10/17 13:27:41.129", T0 + 129_000_000),  # nvidia-smi
        (1_760_707_661, T0),
        (1_760_707_661_129, T0 + 129_000_000),
        (1_760_707_661_129_926, T0 + 129_926_000),
        (T0 + 7, T0 + 7),
        (1_760_707_661.5, T0 + 500_000_000),
        ("1760707661", T0),
        ("yesterday", None),
        ("2025-02-30T00:00:00Z", None),
        (True, None),
    ],
)
def test_accepted_time_forms(value, expected):
    assert parse_time_ns(value) == expected


def test_time_column_found_by_name_and_value():
    assert find_time_column({"gpu": 0, "time": "soon", "event_timestamp": "2025-10-17T13:27:41Z"}) == "event_timestamp"
    assert find_time_column({"gpu": 0, "ts": 1_760_707_661}) == "ts"
    assert find_time_column({"gpu": 0, "host": "a"}) is None


# -- pacing in virtual time ----------------------------------------------------------------------------


def paced_sends(replay, speed_base=0.0, max_batch=4000):
    """(virtual time, [gpu values]) of each send of a paced replay."""
    sends = []

    async def send(batch, stamps):
        sends.append((asyncio.get_running_loop().time(), [orjson.loads(item[0])["gpu"] for item in batch]))

    async def main():
        await run_paced(replay.items(), send, asyncio.get_running_loop().time() + speed_base, max_batch)

    run_virtual(main())
    return sends


def test_paced_rows_go_at_their_recorded_gaps_in_same_time_groups(tmp_path):
    gaps = [100, 250, 5, 1000, 40]
    path = recording(tmp_path, gaps, per_time=3)
    sends = paced_sends(replay_of(path, passes=1, pace="timestamps", timestamp_column="timestamp"))
    assert [gpus for _, gpus in sends] == [[0, 1, 2]] * 6  # each time's rows go together, and only they
    expected = [sum(gaps[:i]) / 1000 for i in range(6)]
    assert [t for t, _ in sends] == pytest.approx(expected, abs=1e-6)


def test_speed_divides_the_gaps_and_long_gaps_are_capped(tmp_path):
    gaps = [1000, 120_000, 1000]  # the second is over --max-gap
    path = recording(tmp_path, gaps, per_time=1)
    sends = paced_sends(replay_of(path, passes=1, pace="timestamps", timestamp_column="timestamp", speed=10.0, max_gap=5.0))
    assert [t for t, _ in sends] == pytest.approx([0.0, 0.1, 0.6, 0.7], abs=1e-6)


def test_paced_passes_follow_each_other_by_span_and_one_interval(tmp_path):
    path = recording(tmp_path, [100, 100, 300], per_time=1)  # span 0.5 s, typical interval 0.1 s
    sends = paced_sends(replay_of(path, passes=3, pace="timestamps", timestamp_column="timestamp"))
    assert [t for t, _ in sends] == pytest.approx([0, 0.1, 0.2, 0.5, 0.6, 0.7, 0.8, 1.1, 1.2, 1.3, 1.4, 1.7], abs=1e-6)


# -- shifted times and counters over passes ------------------------------------------------------------


def test_shifted_times_never_go_back_and_counters_keep_rising_over_three_passes(tmp_path):
    path = recording(
        tmp_path, [1000, 1000, 3000, 1000], per_time=4, form=lambda ns: f"2025/10/17 13:{(ns // 10**9) % 3600 // 60:02d}:{(ns // 10**9) % 60:02d}.000"
    )
    anchor = 2_000_000_000 * 10**9
    replay = replay_of(path, passes=3, timestamps="shifted", timestamp_column="timestamp", counter_columns=("energy",), key_columns=("gpu",))
    items = list(replay.items(anchor))
    assert len(items) == 3 * 20 and replay.passes_done == 3
    stamps = [item[1] for item in items]
    assert stamps[0] == anchor
    assert all(a <= b for a, b in zip(stamps, stamps[1:]))
    # the second pass starts one typical interval (1 s) after the first pass's last row (6 s in)
    assert stamps[20] == anchor + 7 * 10**9 and stamps[40] == anchor + 14 * 10**9
    per_gpu = defaultdict(list)
    for raw, *_ in items:
        fields = orjson.loads(raw)
        per_gpu[fields["gpu"]].append(fields["energy"])
    for gpu, values in per_gpu.items():
        assert all(a <= b for a, b in zip(values, values[1:])), (gpu, values)
        assert values[5] == values[4]  # pass 2 starts where pass 1 ended: the increase over one pass (40) added
        assert values[10] == values[0] + 80


def test_original_times_are_the_rows_own(tmp_path):
    path = recording(tmp_path, [250], per_time=1, form=lambda ns: str(ns))
    replay = replay_of(path, passes=2, timestamps="original", timestamp_column="timestamp")
    assert [item[1] for item in replay.items(123)] == [T0, T0 + 250_000_000] * 2


# -- shard, keys, filters (unit) -----------------------------------------------------------------------


def test_shard_by_key_splits_every_row_to_exactly_one_worker(tmp_path):
    path = recording(tmp_path, [10] * 30, per_time=8)
    got = []
    for index in range(3):
        replay = replay_of(path, index=index, passes=1, key_columns=("host", "gpu"), shard=True, workers=3)
        got.append([orjson.loads(raw) for raw, *_ in replay.items()])
        assert replay.recording.mine == len(got[-1])
    keys = [{(f["host"], f["gpu"]) for f in rows} for rows in got]
    assert sum(len(rows) for rows in got) == 31 * 8
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])


def test_filters_must_all_match_and_count_what_they_skip(tmp_path):
    path = recording(tmp_path, [10] * 9, per_time=4)
    replay = replay_of(path, passes=1, filters=(("gpu", ("1", "2")), ("host", ("h0",))))
    rows = [orjson.loads(raw) for raw, *_ in replay.items()]
    assert {r["gpu"] for r in rows} == {2} and len(rows) == 10
    assert replay.source.skipped["filtered"] == 30


# -- profiles in virtual time --------------------------------------------------------------------------


def profile_counts(text, seconds=None, workers=1):
    """Messages sent per step (by the steps' boundaries) by one worker following the profile."""
    profile = parse_profile(text)
    sent = []

    async def send(batch, stamps):
        sent.append((asyncio.get_running_loop().time(), len(batch)))

    async def main():
        start = asyncio.get_running_loop().time()
        await run_profile(iter(lambda: (b"{}", 0, 0.0, b""), None), send, ProfileRun(profile, 1 / workers), 4000)
        return start

    start = run_virtual(main())
    edges, t = [], 0.0
    for step in profile.steps:
        edges.append((t, t + step.duration, step.total / workers))
        t += step.duration
    return [(sum(n for when, n in sent if a <= when - start < b), expected) for a, b, expected in edges], profile


def test_profile_count_per_step_within_one_percent_of_its_integral():
    counts, profile = profile_counts("ramp 100 10000 60s; hold 10000 30s; burst 20000 1s every 5s for 20s; ramp 10000 0 30s")
    for got, expected in counts:
        assert abs(got - expected) <= max(0.01 * expected, 2), counts
    assert profile.state(61)["text"] == "hold 10000 30s" and profile.state(61)["target_rate"] == 10000


def test_profile_split_over_workers():
    counts, _ = profile_counts("hold 3000 10s; ramp 3000 0 10s", workers=3)
    for got, expected in counts:
        assert abs(got - expected) <= max(0.01 * expected, 2), counts


@pytest.mark.parametrize("text", ["hold 10", "ramp 1 2", "burst 10 5s every 2s", "wait 10s", "hold -1 5s", "hold 10 0s", ""])
def test_bad_profiles_are_refused(text):
    with pytest.raises(ValueError):
        parse_profile(text)


# -- through the command line ---------------------------------------------------------------------------


def keyed_csv(tmp_path, rows=600):
    lines = ["row,host,gpu,util"] + [f"{i},node-{i % 5},{i % 4},{i % 97}" for i in range(rows)]
    path = tmp_path / "keyed.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_shard_three_workers_once_delivers_every_row_once_in_key_order(procs, tmp_path):
    path = keyed_csv(tmp_path)
    data = tmp_path / "data"
    proc, _ = start_streamer(path, "--workers=3", "--rate=0", "--shard", "--key-columns=host,gpu", "--once", "--persistence", f"--persistence-dir={data}")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    assert "Completed 1 pass" in proc.output and "acknowledged=600 unacknowledged=0" in proc.output
    records = dump(data, "--meta")
    rows = [r["message"]["fields"]["row"] for r in records]
    assert sorted(rows) == list(range(600))  # every row, exactly once
    by_key = defaultdict(list)
    for r in records:
        f = r["message"]["fields"]
        by_key[(f["host"], f["gpu"])].append((r["producer"], r["seq"], f["row"]))
    assert len(by_key) == 20
    producers = set()
    for key, entries in by_key.items():
        assert len({p for p, _, _ in entries}) == 1, key  # one worker per key
        producers.add(entries[0][0])
        assert [row for _, _, row in sorted(entries, key=lambda e: e[1])] == sorted(row for _, _, row in entries), key  # in file order
    assert len(producers) == 3


def test_once_with_filter_exits_zero_with_a_summary(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=100)
    proc = Proc("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=0", "--passes=2", "--filter=host=node-1,node-2", "--filter=gpu=1,2,3")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    line = [ln for ln in proc.lines if "Completed" in ln][-1]
    expected = 2 * sum(1 for i in range(100) if i % 5 in (1, 2) and i % 4 in (1, 2, 3))
    assert f"sent={expected} acknowledged={expected} unacknowledged=0" in line
    assert f"filtered={200 - expected}" in line and "achieved" in line
    assert summary(proc.output)["published"] == expected


def test_once_exits_one_when_the_broker_is_gone_before_the_end(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=400)
    broker, zmq_url, http = start_broker()
    procs.append(broker)
    proc = Proc("streamer", f"--csv={path}", f"--broker-url={zmq_url}", "--http-port=0", "--rate=20", "--once", "--shutdown-timeout=1")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 20, message="20 messages")
    broker.kill()
    assert proc.wait(60) == 1, proc.output
    line = [ln for ln in proc.lines if "were not acknowledged" in ln][-1]
    unacked = int(line.split()[-5])
    assert unacked > 0 and summary(proc.output)["unacknowledged"] == unacked
    assert "Traceback" not in proc.output


def test_continuous_run_drains_cleanly_after_a_worker_crashed_holding_unacknowledged(procs, sample_csv):
    broker, zmq_url, _ = start_broker()
    procs.append(broker)
    proc, http = start_streamer_to(zmq_url, sample_csv, "--workers=2", "--rate=200", "--shutdown-timeout=5")
    procs.append(proc)
    pids = wait_until(lambda: len(p := workers_of(proc.pid)) == 2 and p, message="2 workers")
    wait_until(lambda: all(w["published"] > 0 for w in get_json(f"{http}/stats")[1]["workers"].values()), message="both workers published")
    broker.signal(signal.SIGSTOP)  # no acknowledgments: what the workers send stays unacknowledged
    try:
        wait_until(lambda: get_json(f"{http}/stats")[1]["workers"]["0"]["unacknowledged"] > 0, message="worker 0 holds unacknowledged messages")
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: get_json(f"{http}/stats")[1]["workers"]["0"].get("unconfirmed", 0) > 0, message="unconfirmed counted")
    finally:
        broker.signal(signal.SIGCONT)
    wait_until(lambda: len(workers_of(proc.pid)) == 2, timeout=30, message="2 workers again")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.output  # a completed drain: exit 0, the crash's messages reported apart
    figures = summary(proc.output)
    assert figures["unacknowledged"] == 0 and " unconfirmed=" in figures["line"]


def test_paced_replay_through_the_command_line_keeps_the_recorded_gaps(procs, tmp_path):
    path = recording(tmp_path, [1000, 2000, 1200, 3000], per_time=2, form=lambda ns: f"2025-10-17T13:27:{(ns // 10**9) % 60:02d}.{ns % 10**9:09d}Z")
    data = tmp_path / "data"
    proc, _ = start_streamer(path, "--pace=timestamps", "--speed=2", "--timestamps=now", "--once", "--persistence", f"--persistence-dir={data}")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    records = [r["message"] for r in dump(data, "--meta")]
    sent_at = [parse_time_ns(m["timestamp"]) for m in records]
    own = [parse_time_ns(m["fields"]["timestamp"]) for m in records]
    assert len(records) == 10
    for i in range(1, 10):
        expected = (own[i] - own[0]) / 2
        # a loaded shared CI machine stalls for 100s of ms: 250 ms here, where every step is at
        # least 500 ms (the strict figure is `tests/bench/replay.py pacing`'s)
        assert abs((sent_at[i] - sent_at[0]) - expected) < 250e6, (i, sent_at[i] - sent_at[0], expected)
    assert sent_at[1] == sent_at[0] or abs(sent_at[1] - sent_at[0]) < 50e6  # the same time: sent together


def test_shifted_times_through_the_command_line_over_three_passes(procs, tmp_path):
    path = recording(tmp_path, [1000, 1000, 500], per_time=3, form=lambda ns: str(ns // 1000))
    data = tmp_path / "data"
    proc, _ = start_streamer(
        path, "--rate=0", "--passes=3", "--timestamps=shifted", "--counter-column=energy", "--key-columns=gpu", "--persistence", f"--persistence-dir={data}"
    )
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    messages = dump(data)
    stamps = [parse_time_ns(m["timestamp"]) for m in messages]
    assert len(stamps) == 36 and all(a <= b for a, b in zip(stamps, stamps[1:]))
    energy = defaultdict(list)
    for m in messages:
        energy[m["fields"]["gpu"]].append(m["fields"]["energy"])
    assert all(all(a <= b for a, b in zip(v, v[1:])) for v in energy.values()), energy


@pytest.mark.parametrize(
    "args, words",
    [
        (["--filter=nope=1"], "no column named 'nope'"),
        (["--filter=gpu"], "is not COLUMN=V1,V2"),
        (["--key-columns=gpu,nope"], "no column named 'nope'"),
        (["--pace=timestamps"], "no column named like timestamp"),
        (["--profile=hold 10"], "is not a step"),
        (["--once", "--passes=3"], "--once is --passes 1"),
        (["--speed=0"], "must be a finite number > 0"),
        (["--profile-repeat"], "repeats a --profile"),
    ],
)
def test_bad_replay_options_exit_two_with_one_line(tmp_path, args, words):
    path = keyed_csv(tmp_path, rows=5)
    proc = Proc("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0", *args)
    assert proc.wait(30) == 2
    assert words in proc.output and "Traceback" not in proc.output


def run_on_terminal(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """The streamer with a pseudo-terminal as its stdout and stderr: (exit code, what it showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "streamer", *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_progress_bar_on_a_terminal_and_not_with_no_progress(tmp_path):
    path = keyed_csv(tmp_path, rows=300)
    code, shown = run_on_terminal(f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=200", "--once")
    assert code == 0, shown
    assert re.search(r"\d+/300 ", shown) and "msg/s" in shown, shown
    code, shown = run_on_terminal(f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=200", "--once", "--no-progress")
    assert code == 0, shown
    assert "/300 " not in shown and "msg/s" not in shown and "Completed 1 pass" in shown


def test_sharded_skips_are_counted_once(procs, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("row,host\n" + "".join(f"{i},node-{i % 4}\n" if i % 10 else f"{i},node,extra\n" for i in range(100)))
    proc = Proc("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=0", "--workers=3", "--shard", "--once")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    line = [ln for ln in proc.lines if "Completed" in ln][-1]
    assert "sent=90 acknowledged=90" in line and "field_count=10" in line, line
    assert "msg/s" not in proc.output  # no progress bar when stderr is not a terminal


def test_profile_drives_the_total_rate_shows_its_step_and_ends(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=50)
    proc, http = start_streamer(path, "--workers=2", "--profile=hold 100 3s; ramp 100 0 2s")
    procs.append(proc)
    state = wait_until(
        lambda: (w := get_json(f"{http}/stats/telemetry")[1]["workers"]["0"]).get("profile", {}).get("step") and w["profile"], message="profile in /stats"
    )
    assert state["step"] == 1 and state["of"] == 2 and state["text"] == "hold 100 3s" and state["target_rate"] == 50.0
    assert proc.wait(60) == 0, proc.output
    line = [ln for ln in proc.lines if "Completed the profile" in ln][-1]
    sent = int(re.search(r"sent=(\d+)", line).group(1))
    assert abs(sent - 400) <= 4, line  # the integral: 100/s for 3 s, then 100 -> 0 over 2 s


def test_total_rate_is_split_over_the_workers(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=50)
    proc, _ = start_streamer(path, "--workers=4", "--total-rate=200")
    procs.append(proc)
    proc.wait_for_line(r"Starting 4 workers, 50 messages/s per worker")


def test_keys_travel_in_the_envelope_to_dump_and_the_stream(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=40)
    data = tmp_path / "data"
    proc, _ = start_streamer(path, "--rate=0", "--once", "--key-columns=host,gpu", "--persistence", f"--persistence-dir={data}")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    messages = dump(data)
    assert len(messages) == 40
    for m in messages:
        assert list(m) == ["timestamp", "key", "fields"]
        assert m["key"] == f"{m['fields']['host']}/{m['fields']['gpu']}"


def test_the_readme_dcgm_example_runs_as_written(procs, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    command = re.search(r"\n    (telemetry-streamer --csv=data/dcgm_sample\.csv .*?--once)\n", text, re.S).group(1)
    args = command.replace("\\\n", " ").split()[1:]
    data = tmp_path / "data"
    proc = Proc("streamer", *args, "--broker-port=0", "--http-port=0", "--persistence", f"--persistence-dir={data}")
    procs.append(proc)
    assert proc.wait(120) == 0, proc.output
    assert "Completed 1 pass" in proc.output and "sent=240 acknowledged=240 unacknowledged=0" in proc.output
    messages = dump(data)
    assert sorted((m["key"], m["fields"]["timestamp"]) for m in messages) == sorted(
        (f"{m['fields']['hostname']}/{m['fields']['gpu']}", m["fields"]["timestamp"]) for m in messages
    )
    assert len({m["key"] for m in messages}) == 8


async def _nats_messages(url: str, subject: str, count: int) -> list[tuple[str, dict]]:
    import nats
    from nats.js.api import DeliverPolicy

    nc = await nats.connect(url)
    try:
        got: list[tuple[str, dict]] = []
        done = asyncio.Event()

        async def on_message(msg) -> None:
            got.append((msg.subject, orjson.loads(msg.data)))
            if len(got) >= count:
                done.set()

        sub = await nc.jetstream().subscribe(subject, stream="TELEMETRY", cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        await asyncio.wait_for(done.wait(), 60)
        await sub.unsubscribe()
        return got
    finally:
        await nc.close()


def test_keys_become_nats_subjects(procs, tmp_path):
    from natsserver import NatsServer

    server = NatsServer(tmp_path / "js").start()
    procs.append(server.proc)
    path = tmp_path / "keyed.csv"
    path.write_text("row,host,gpu\n" + "".join(f"{i},node {i % 3}.lab,{i % 2}\n" for i in range(60)))
    proc = Proc(
        "streamer", f"--csv={path}", f"--broker-url={server.url}", "--http-port=0", "--nats-create-stream", "--rate=0", "--once", "--key-columns=host,gpu"
    )
    procs.append(proc)
    assert proc.wait(90) == 0, proc.output
    got = asyncio.run(_nats_messages(server.url, "telemetry.>", 60))
    assert sorted(m["fields"]["row"] for _, m in got) == list(range(60))
    for subject, m in got:
        host, gpu = m["fields"]["host"], m["fields"]["gpu"]
        assert m["key"] == f"{host}/{gpu}"
        assert subject == f"telemetry.{host.replace(' ', '_').replace('.', '_')}.{gpu}", subject
    # telemetry-broker tail reads them back, with their subjects
    result = subprocess.run(
        [sys.executable, "-m", "broker", "tail", f"--broker-url={server.url}", "--from-start", "--count=60", "--meta"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 60 and all(line["subject"].startswith("telemetry.node_") for line in lines)
    assert sorted(line["message"]["fields"]["row"] for line in lines) == list(range(60))


def test_a_worker_with_no_rows_finishes_at_once_or_idles(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=20)
    proc = Proc("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=0", "--once", "--filter=host=nowhere")
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    assert "sent=0 acknowledged=0" in proc.output and "filtered=20" in proc.output
    # continuous, 3 workers sharded by a key with one value: two have nothing to send and wait
    proc, http = start_streamer(path, "--workers=3", "--rate=50", "--shard", "--key-columns=gpu", "--filter=gpu=1")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1]["messages"] >= 20, message="20 messages")
    busy = [w for w in get_json(f"{http}/stats/telemetry")[1]["workers"].values() if w["sent"]]
    assert len(busy) == 1
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.output


def test_replay_options_from_the_environment(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=100)
    env = {"TELEMETRY_STREAMER_ONCE": "true", "TELEMETRY_STREAMER_FILTER": "host=node-1 gpu=1,2", "TELEMETRY_STREAMER_KEY_COLUMNS": "host,gpu"}
    proc = Proc("streamer", f"--csv={path}", "--broker-port=0", "--http-port=0", "--rate=0", env=env)
    procs.append(proc)
    assert proc.wait(60) == 0, proc.output
    expected = sum(1 for i in range(100) if i % 5 == 1 and i % 4 in (1, 2))
    assert "Completed 1 pass" in proc.output and f"sent={expected} acknowledged={expected}" in proc.output


def test_a_slow_profile_wakes_when_a_message_is_due_not_every_tick():
    class CountingLoop(VirtualClockLoop):
        iterations = 0

        def _run_once(self):
            CountingLoop.iterations += 1
            super()._run_once()

    sent = []

    async def send(batch, stamps):
        sent.append(asyncio.get_running_loop().time())

    loop = CountingLoop()
    try:
        loop.run_until_complete(run_profile(iter(lambda: (b"{}", 0, 0.0, b""), None), send, ProfileRun(parse_profile("hold 2 10s"), 1.0), 4000))
    finally:
        loop.close()
    assert len(sent) == 20
    assert sent[:3] == pytest.approx([0.5, 1.0, 1.5], abs=0.011)  # each as it falls due
    assert CountingLoop.iterations < 400  # waking every 10 ms would take over 1000


def test_a_repeated_profile_loops_and_never_finishes():
    profile = parse_profile("hold 10 1s; ramp 10 0 1s", repeat=True)
    assert profile.count(2.0) == pytest.approx(15.0) and profile.count(4.5) == pytest.approx(30 + 10 * 0.5)
    assert not profile.finished(1000.0) and profile.state(2.25)["step"] == 1 and profile.state(3.5)["text"] == "ramp 10 0 1s"
    once = parse_profile("hold 10 1s; ramp 10 0 1s")
    assert once.finished(2.0) and once.count(10.0) == pytest.approx(15.0) and once.state(5.0)["finished"]


def test_standard_input_takes_once_but_not_the_options_that_read_again():
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "streamer", "--csv=-", "--broker-port=0", "--http-port=0", "--rate=0", *args],
            cwd=ROOT,
            input="a,b\n1,2\n3,4\n",
            capture_output=True,
            text=True,
            timeout=60,
        )

    once = run("--once")
    assert once.returncode == 0 and "published=2" in once.stderr, once.stderr
    shard = run("--once", "--filter=a=1")
    assert shard.returncode == 2 and "need inputs that can be read again" in shard.stderr and "Traceback" not in shard.stderr


def test_the_broker_takes_the_replay_skip_reasons_in_reports(procs, tmp_path):
    path = keyed_csv(tmp_path, rows=50)
    proc, http = start_streamer(path, "--rate=500", "--filter=gpu=1")
    procs.append(proc)
    wait_until(lambda: get_json(f"{http}/stats/telemetry")[1].get("skipped", {}).get("filtered", 0) > 0, message="filtered rows in the broker's stats")
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.output
